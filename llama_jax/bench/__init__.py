"""Benchmarks (`python -m llama_jax.bench train|decode|quantize|data|convert`), one module each;
GPU tables in BENCHMARKS.md are reproduced by the scripts under `benchmarks/`."""
