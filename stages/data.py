"""DVC stage ``data``: build the parquet corpus under artifacts/data from params ``data``."""

from __future__ import annotations

from rdn.data import CorpusError, build_corpus
from rdn.io import project_root
from rdn.pipeline.stage import stage_run, write_metrics
from stages import stage_params

OUT = "artifacts/data"


def main(argv: list[str] | None = None) -> int:
    params = stage_params(__doc__, argv)
    root = project_root()
    with stage_run("data", params, ("data",)) as run:
        try:
            manifest = build_corpus(params.data, root / OUT, seed=params.data.seed, root=root)
        except CorpusError as e:
            raise SystemExit(f"data stage failed: {e}") from None
        t, v = manifest["splits"]["train"], manifest["splits"]["val"]
        metrics = {
            "train_documents": t["documents"], "val_documents": v["documents"],
            "train_bytes": t["bytes"], "val_bytes": v["bytes"],
            "shards": len(t["shards"]) + len(v["shards"]),
            **{f"skipped_{k}": n for k, n in manifest["skipped"].items()},
            "seconds": manifest["seconds"],
        }
        run.log_metrics({f"data/{k}": float(x) for k, x in metrics.items()}, flush=True)
        run.log_artifact(root / OUT / "manifest.json")
        write_metrics("data", metrics)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
