"""Byte-level BPE: trained with HF ``tokenizers``, encoded with ``tiktoken`` (same ids, faster)."""

from rdn.tokenizer.bpe import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer, TokenizerError, train_tokenizer

__all__ = ["SPECIAL_TOKENS", "SPLIT_PATTERN", "Tokenizer", "TokenizerError", "train_tokenizer"]
