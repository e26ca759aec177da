"""DVC stage ``base_train``: pretrain the RDN (or plain GPT) model on artifacts/data."""

from __future__ import annotations

from rdn.io import project_root
from rdn.stage import stage_run, write_metrics
from stages import stage_params


def main(argv: list[str] | None = None) -> int:
    params = stage_params(__doc__, argv)
    from rdn.train.base import run_base_train  # heavy imports after validation

    with stage_run("base_train", params, ("model", "coords", "base_train")) as run:
        summary = run_base_train(params, project_root(), run)
        run.log_metrics({f"base_train/{k}": float(v) for k, v in summary.items()
                         if isinstance(v, (int, float)) and v is not None}, flush=True)
        write_metrics("base_train", summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
