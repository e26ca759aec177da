"""DVC stage ``mid_train``: mid-train the base model on text plus task conversations."""

from __future__ import annotations

from stages import run_training_stage

RUNNER = "rdn.train.posttrain:run_mid_train"  # imported after params validate


def main(argv: list[str] | None = None) -> int:
    return run_training_stage(__doc__, argv, "mid_train", ("mid_train", "optim"), RUNNER)


if __name__ == "__main__":
    raise SystemExit(main())
