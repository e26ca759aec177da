"""DVC stage ``evaluate``: val bpb and held-out task accuracy of every stage's checkpoint."""

from __future__ import annotations

from stages import run_training_stage

RUNNER = "rdn.eval.evaluate:run_evaluate"  # imported after params validate


def main(argv: list[str] | None = None) -> int:
    return run_training_stage(__doc__, argv, "evaluate", ("evaluate",), RUNNER, metrics_name="eval")


if __name__ == "__main__":
    raise SystemExit(main())
