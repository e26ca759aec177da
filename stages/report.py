"""DVC stage ``report``: reports/report.md with the metrics table, curves and environment."""

from __future__ import annotations

from stages import run_training_stage

RUNNER = "rdn.eval.report:run_report"


def main(argv: list[str] | None = None) -> int:
    return run_training_stage(__doc__, argv, "report", (), RUNNER)


if __name__ == "__main__":
    raise SystemExit(main())
