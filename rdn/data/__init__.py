"""Corpus preparation (parquet shards) and, later, the training data loaders."""

from rdn.data.corpus import CorpusError, build_corpus, iter_documents, read_manifest

__all__ = ["CorpusError", "build_corpus", "iter_documents", "read_manifest"]
