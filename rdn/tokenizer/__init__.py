"""Byte-level BPE: trained with HF ``tokenizers``, encoded with ``tiktoken`` (same ids, faster)."""

from rdn.tokenizer.bpe import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer, TokenizerError, train_tokenizer
from rdn.tokenizer.chat import ConversationError, render_conversation, render_for_completion, validate_conversation

__all__ = ["SPECIAL_TOKENS", "SPLIT_PATTERN", "Tokenizer", "TokenizerError", "train_tokenizer"]
