"""Benchmarks: each claim measured side by side with its baseline in one run.

``python -m bench`` (``make bench``) runs every ``bench/bench_*.py`` module's
``run(ctx)`` and writes ``bench/results.json`` and ``bench/results.md``.
"""
