"""Byte-level BPE: trained with HF ``tokenizers``, encoded with ``tiktoken`` (same ids, faster)."""

from rdn.tokenizer.bpe import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer, TokenizerError, train_tokenizer

# The chat format lives in rdn.tokenizer.chat; it is not imported here so that stages that
# only tokenize text (and DVC's dependency lists for them) do not depend on it.

__all__ = ["SPECIAL_TOKENS", "SPLIT_PATTERN", "Tokenizer", "TokenizerError", "train_tokenizer"]
