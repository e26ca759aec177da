"""Training data: corpus preparation (parquet shards, re-exported here), the BOS-aligned
packing loader (:mod:`rdn.data.loader`) and the packing of rendered conversations
(:mod:`rdn.data.conversations`), imported from their own modules (they need torch)."""

from rdn.data.corpus import CorpusError, build_corpus, iter_documents, read_manifest

__all__ = ["CorpusError", "build_corpus", "iter_documents", "read_manifest"]
