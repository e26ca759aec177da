"""The ``rdn`` console script: params validation, chat, serve, tracking and comparison commands."""
