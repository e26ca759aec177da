"""DVC stage ``tokenizer``: train the BPE on artifacts/data, write artifacts/tokenizer."""

from __future__ import annotations

from rdn.data import CorpusError, iter_documents
from rdn.io import project_root, sha256_file
from rdn.pipeline.stage import stage_run, write_metrics
from rdn.tokenizer import TokenizerError, train_tokenizer
from stages import stage_params

DATA, OUT = "artifacts/data", "artifacts/tokenizer"


def main(argv: list[str] | None = None) -> int:
    params = stage_params(__doc__, argv)
    root = project_root()
    with stage_run("tokenizer", params, ("tokenizer",)) as run:
        try:
            val_docs = list(iter_documents(root / DATA, "val"))
            meta = train_tokenizer(params.tokenizer, iter_documents(root / DATA, "train"), val_docs, root / OUT,
                                   source_manifest_sha256=sha256_file(root / DATA / "manifest.json"))
        except (CorpusError, TokenizerError) as e:
            raise SystemExit(f"tokenizer stage failed: {e}") from None
        metrics = {k: meta[k] for k in ("vocab_size", "val_bytes_per_token", "val_tokens", "val_bytes",
                                         "train_chars", "train_seconds", "duplicate_merges")}
        run.log_metrics({f"tokenizer/{k}": float(v) for k, v in metrics.items()}, flush=True)
        run.log_artifact(root / OUT / "meta.json")
        write_metrics("tokenizer", metrics)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
