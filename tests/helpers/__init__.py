"""Test and benchmark helpers: a tiny offline tokenizer and model, and a local OpenAI-compatible stub server.

They live outside the ``trl_sgpo`` package so that nothing users import pulls them in. Tests find them through
pytest's rootdir path; benchmarks add ``tests/`` to ``sys.path``.
"""
