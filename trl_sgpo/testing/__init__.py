"""Test helpers that tests and benchmarks share: a local OpenAI-compatible server with injectable faults."""

from .openai_stub import OpenAIStub, default_reply

__all__ = ["OpenAIStub", "default_reply"]
