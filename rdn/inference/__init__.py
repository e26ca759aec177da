"""Inference: the batched KV-cache engine and the calculator tool it executes."""
