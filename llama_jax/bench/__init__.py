"""Benchmarks (`python -m llama_jax.bench train|decode|data|convert`), one module each; GPU tables
in BENCHMARKS.md are reproduced by `benchmarks/gpu.sh`."""
