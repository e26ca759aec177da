"""DVC stage ``chat_sft``: supervised fine-tuning of the mid model on conversations."""

from __future__ import annotations

from stages import run_training_stage

RUNNER = "rdn.train.posttrain:run_chat_sft"  # imported after params validate


def main(argv: list[str] | None = None) -> int:
    return run_training_stage(__doc__, argv, "chat_sft", ("chat_sft", "optim"), RUNNER)


if __name__ == "__main__":
    raise SystemExit(main())
