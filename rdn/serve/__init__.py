"""Serving trained chat models over HTTP (``rdn serve-chat``): :mod:`rdn.serve.batcher`
batches concurrent requests into one decode loop, :mod:`rdn.serve.app` speaks the OpenAI
chat-completions protocol and serves the chat page in ``static/``."""
