"""`python -m llama_jax.serve --checkpoint DIR`: an OpenAI-compatible server for one model.

  python -m llama_jax.serve --checkpoint DIR [--host 127.0.0.1] [--port 8000] [--max_batch 64]
      [--api_key KEY] [--warmup] [--max_len N] [--tensor T] [--dtype bfloat16]
      [--decode_steps 8] [--max_decode_steps 32] [--prefill_tokens 4096] [--compilation_cache DIR]

DIR is anything `llama_jax.load` reads (with a tokenizer). `--tensor T` splits the model over T
devices (tensor parallel, as `generate.py --tensor`); the key may also come from the environment
(LLAMA_JAX_API_KEY), which keeps it out of the process list.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

SWITCH_INTERVAL_S = 0.0005  # how often a thread holding the GIL offers it to a waiting one (see `main`)
# A restart's warmup reads its programs back instead of compiling them again (JAX keys each entry
# by the program, the flags, the devices and the versions, so nothing stale is read).
DEFAULT_CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                             "llama_jax", "compilation")
DEFAULT_CACHE_BYTES = 4 << 30  # the default directory's cap (least recently used entries go first)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m llama_jax.serve", description=__doc__.splitlines()[0])
  p.add_argument("--checkpoint", required=True,
                 help="model directory, training workdir, Hugging Face or Meta directory")
  p.add_argument("--tokenizer", help="tokenizer model (default: the checkpoint's own)")
  p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
  p.add_argument("--port", type=int, default=8000)
  p.add_argument("--max_batch", type=int, default=64, help="requests decoded together (KV-cache slots)")
  p.add_argument("--max_len", type=int,
                 help="tokens per slot, prompt and answer together (default: the model's context)")
  p.add_argument("--decode_steps", type=int, default=8, help="decode steps per device call")
  p.add_argument("--max_decode_steps", type=int,
                 help="most decode steps per call, taken while no request waits for a slot "
                      "(default: 4 x --decode_steps)")
  p.add_argument("--prefill_tokens", type=int, default=4096,
                 help="most (padded) prompt tokens prefilled together in one device call")
  p.add_argument("--api_key", default=os.environ.get("LLAMA_JAX_API_KEY"),
                 help="require 'Authorization: Bearer KEY' on /v1 (default: $LLAMA_JAX_API_KEY)")
  p.add_argument("--warmup", action="store_true", help="compile every shape before serving")
  p.add_argument("--model_name", help="the name clients use (default: the checkpoint directory's name)")
  p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="compute dtype")
  p.add_argument("--tensor", type=int, default=1, help="split the model over this many devices")
  p.add_argument("--max_body_bytes", type=int, default=4 << 20, help="largest request body accepted")
  p.add_argument("--decode_attention", default="auto", choices=("auto", "xla", "pallas"),
                 help="decode attention: the ragged kernel that reads each slot's own length (pallas), "
                      "XLA over the window of the longest (xla); auto: pallas on one GPU")
  p.add_argument("--decode_kernels", default="auto", choices=("auto", "xla", "pallas"),
                 help="decode calls of one row: each block as five fused Pallas kernels (pallas) or "
                      "XLA's (xla); auto: pallas on one GPU. Their roundings differ: with xla a "
                      "request's greedy tokens do not depend on the rows a call runs (on a CPU)")
  p.add_argument("--static_steps", action=argparse.BooleanOptionalAction, default=True,
                 help="compile each decode call length as its own program (a few %% faster a step on "
                      "a GPU; --no-static_steps: one program for every length, a shorter --warmup)")
  p.add_argument("--pack_prompts", action=argparse.BooleanOptionalAction, default=True,
                 help="prefill a round's prompts side by side in the rows of a call (less padding; "
                      "--no-pack_prompts: one prompt a row)")
  p.add_argument("--compilation_cache", default=os.environ.get("JAX_COMPILATION_CACHE_DIR") or DEFAULT_CACHE,
                 help="JAX's persistent compilation cache: the warmup's programs kept for the next start "
                      f"(default: $JAX_COMPILATION_CACHE_DIR, else {DEFAULT_CACHE}; '' for none)")
  p.add_argument("--profile_dir", help="enables POST /start_profile and /stop_profile: a jax.profiler "
                 "trace of the server under load, written here")
  p.add_argument("--log_level", default="info", choices=("debug", "info", "warning", "error"))
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

  def run():
    from llama_jax.generate.cli import UsageError, make_mesh
    for name in ("max_batch", "decode_steps", "prefill_tokens", "max_body_bytes", "tensor"):
      if getattr(args, name) < 1:
        raise UsageError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.max_decode_steps is not None and args.max_decode_steps < args.decode_steps:
      raise UsageError(f"--max_decode_steps must be >= --decode_steps ({args.decode_steps}), "
                       f"got {args.max_decode_steps}")
    if not 0 <= args.port < 65536:
      raise UsageError(f"--port must be in [0, 65535], got {args.port}")
    if args.tokenizer and not os.path.isfile(args.tokenizer):
      raise UsageError(f"--tokenizer {args.tokenizer}: no such file")
    try:
      import fastapi  # noqa: F401
      import uvicorn  # noqa: F401
    except ImportError as e:
      raise UsageError(f"serving needs FastAPI and uvicorn ({e}): pip install 'llama_jax[serve]'") from None

    import jax
    if args.compilation_cache:  # before anything compiles
      jax.config.update("jax_compilation_cache_dir", os.path.expanduser(args.compilation_cache))
      if args.compilation_cache == DEFAULT_CACHE:  # a directory the user did not choose: bounded
        jax.config.update("jax_compilation_cache_max_size", DEFAULT_CACHE_BYTES)
    else:  # '': none, whatever the environment says
      jax.config.update("jax_enable_compilation_cache", False)
    import llama_jax
    from llama_jax.convert.source import open_source
    from llama_jax.serve.server import build, listen, uvicorn_server
    # The checks and the mesh need the config alone; then the weights load straight into their shards.
    config = open_source(args.checkpoint).config
    if args.max_len is not None and not 0 < args.max_len <= config.max_seq_len:
      raise UsageError(f"--max_len must be in [1, {config.max_seq_len}] (the model's context), "
                       f"got {args.max_len}")
    mesh = make_mesh(args, config)
    model = llama_jax.load(args.checkpoint, dtype=args.dtype, tokenizer=args.tokenizer, mesh=mesh)
    if model.tokenizer is None:
      raise UsageError(f"{args.checkpoint} has no tokenizer; pass --tokenizer")
    name = args.model_name or os.path.basename(os.path.normpath(args.checkpoint))
    sock = listen(args.host, args.port)  # a taken port fails here, before the long warmup
    served = build(model, model_name=name, max_batch=args.max_batch, max_len=args.max_len,
                   decode_steps=args.decode_steps, max_decode_steps=args.max_decode_steps,
                   prefill_tokens=args.prefill_tokens, api_key=args.api_key, warmup=args.warmup,
                   max_body_bytes=args.max_body_bytes, profile_dir=args.profile_dir,
                   decode_attention=args.decode_attention, static_steps=args.static_steps,
                   pack_prompts=args.pack_prompts, decode_kernels=args.decode_kernels)
    # The scheduler's threads and uvicorn's event loop share the GIL; a thread that wants it back
    # waits up to the switch interval (5 ms by default) while another runs Python, a stall on the
    # way to every device call. A server wants the handoffs sooner.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    print(f"serving {name!r} on http://{args.host}:{sock.getsockname()[1]} ({args.max_batch} slots of "
          f"{served.engine.cache_len} tokens{', API key required' if args.api_key else ''})",
          file=sys.stderr, flush=True)
    try:
      # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again.
      uvicorn_server(served.app, args.log_level).run(sockets=[sock])
    except KeyboardInterrupt:
      pass
    finally:
      served.scheduler.stop()
    return 0

  from llama_jax.errors import run_cli
  try:
    return run_cli(run)
  except KeyboardInterrupt:  # before serving started (loading, warmup)
    return 130


if __name__ == "__main__":
  sys.exit(main())
