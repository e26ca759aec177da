"""DVC stage ``chat_rl``: on-policy RL of the SFT model on a verifiable task."""

from __future__ import annotations

from stages import run_training_stage

RUNNER = "rdn.train.rl:run_chat_rl"  # imported after params validate


def main(argv: list[str] | None = None) -> int:
    return run_training_stage(__doc__, argv, "chat_rl", ("chat_rl", "optim"), RUNNER)


if __name__ == "__main__":
    raise SystemExit(main())
