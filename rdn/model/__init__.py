"""The rdn language model: a nanochat-style GPT with optional hierarchical coordinate embeddings."""

from rdn.model.attention import KVCache, apply_rotary_emb, attention, attention_mask, rotary_tables
from rdn.model.gpt import GPT, GPTConfig, has_value_embedding, norm

__all__ = ["GPT", "GPTConfig", "KVCache", "apply_rotary_emb", "attention", "attention_mask",
           "has_value_embedding", "norm", "rotary_tables"]
