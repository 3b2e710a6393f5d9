"""Generation: text from a model, batched or streamed; `python generate.py` is `cli`.

  engine     the jitted prefill and decode loop over a KV cache, per-row sampling settings
  cache      the per-layer key/value cache the engine writes in place
  slots      continuous batching: JetStream's prefill / insert / generate over a cache of slots
  sampling   greedy, temperature, top-k and top-p as small pure functions
  generator  the host side: prompts into shape buckets and batches, results back in order
  streaming  token chunks into text deltas, a bounded window at a time
  cli        generate.py: prompts, prompt files, streaming and interactive chat
"""

from llama_jax.generate.generator import generate, generate_tokens
from llama_jax.generate.sampling import SamplingParams
from llama_jax.generate.streaming import TextStreamer

__all__ = ["SamplingParams", "TextStreamer", "generate", "generate_tokens"]
