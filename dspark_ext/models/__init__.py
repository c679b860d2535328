"""Small models for the demo and the end-to-end tests: the target LM and its tokenizer."""

from .target import KVCache, TargetConfig, TargetModel, TinyLM  # noqa: F401
