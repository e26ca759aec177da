"""DVC stage ``base_train``: pretrain the RDN (or plain GPT) model on artifacts/data."""

from __future__ import annotations

from stages import run_training_stage

RUNNER = "rdn.train.pretrain:run_base_train"  # imported after params validate


def main(argv: list[str] | None = None) -> int:
    return run_training_stage(__doc__, argv, "base_train", ("model", "coords", "base_train", "optim"), RUNNER)


if __name__ == "__main__":
    raise SystemExit(main())
