"""Serving: an OpenAI-compatible HTTP server with continuous batching (`python -m llama_jax.serve`).

Three layers that do not know each other's details (vLLM's api_server -> LLMEngine -> Scheduler;
JetStream's server -> orchestrator -> engine):
  app        the HTTP layer: OpenAI's routes on FastAPI, validation, server-sent events, the API key
  protocol   OpenAI's wire format: request bodies, error JSON, answers and streamed chunks
  scheduler  which requests hold the engine's slots, admission and prefill between decode calls,
             stop strings, cancellation; plain Python on one thread
  stop_strings  finding stop strings in the growing text, each character read once (KMP)
  server     the engine (`generate.slots`), the scheduler and the app put together; uvicorn
  __main__   the command line
"""
