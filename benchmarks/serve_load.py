"""Serving under load: aggregate output tokens/s and time to first token (p50, p99) of the
OpenAI-compatible server at 1, 16 and 64 concurrent streaming clients, beside `generate.py`'s static
batches (`generate_tokens`) of the same sizes, in one call.

  python benchmarks/serve_load.py [--preset tinyllama_1b] [--clients 1,16,64] [--workdir /tmp/serve_load]

The model is the preset's shape with random weights in bfloat16, saved once with
`llama_jax.Model(cfg, params, tokenizer).save(DIR)` beside a SentencePiece tokenizer padded to the
model's vocabulary (any id a random model draws decodes to something). Three stages, each in a
process of its own so that each has the accelerator to itself:
  static  (a child process) `generate_tokens` on B prompts of the mix's mean prompt length, each
          making the mix's mean answer length, B = each client count; timed after an untimed call
          of the same shapes (the compilation). This is the static batch at its best: no row waits
          for a longer one.
  server  `python -m llama_jax.serve --checkpoint DIR --warmup --max_batch 64 --max_len L`.
  load    this process (which never touches the accelerator): C clients in a closed loop, each
          sending its next request as soon as its previous answer ends, streaming over HTTP
          (httpx, server-sent events). Requests are token-id prompts with `ignore_eos`, so every
          answer has exactly its `max_tokens`. Lengths: prompt and answer each log-normal around
          a median (ShareGPT-like spread), clipped to [16, 512] and [16, 511].
Time to first token is from sending a request to its first streamed token. Tokens/s: "all" is
every answer token of a level over its wall time (first request sent to last answer done), which
includes the drain at the end, when fewer than C requests are left; "steady" counts only until the
last request is sent, while all C clients are busy. Each level also reports the CPU each side
used (a share of one core: the load generator near 1 would mean it, not the server, set the pace).
The goal: at 64 clients, at least 70% of the static batch's tokens/s. A markdown table, then one
JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", default="tinyllama_1b")
  p.add_argument("--dtype", default="bfloat16", help="parameter and compute dtype")
  p.add_argument("--clients", default="1,16,64", help="concurrency levels, comma separated")
  # 24: a level's ramp (every client's first prompt at once) and drain (the last, longest answers
  # with ever fewer clients) are a few percent of it; at 6 (before 2026-11-27's session 8) the drain
  # alone was ~16% of the 64-client level.
  p.add_argument("--requests_per_client", type=int, default=24)
  p.add_argument("--min_requests", type=int, default=8, help="at least this many requests per level")
  p.add_argument("--prompt_median", type=int, default=200)
  p.add_argument("--answer_median", type=int, default=160)
  p.add_argument("--max_prompt", type=int, default=512)
  p.add_argument("--max_answer", type=int, default=511)
  p.add_argument("--max_len", type=int, default=1024, help="the server's tokens per slot")
  p.add_argument("--decode_steps", type=int, default=8, help="the server's decode steps per call")
  p.add_argument("--decode_attention", default="auto", help="the server's (auto, xla, pallas)")
  p.add_argument("--decode_kernels", default="auto", help="the server's and the static batch's (auto, "
                 "xla, pallas): the fused decode blocks, or XLA's")
  p.add_argument("--kernel_variant", default="", help="decode_block's constants set on both sides, as "
                 "benchmarks/decode_variants.py takes them (e.g. ATTENTION_SPLIT=256)")
  p.add_argument("--attention_impl", default="xla", help="the model's (xla, cudnn: flash attention in "
                 "prefill, as configs/tinyllama_1b.py trains), both sides")
  p.add_argument("--temperature", type=float, default=0.0, help="both sides; 0: greedy")
  p.add_argument("--workdir", default="/tmp/serve_load")
  p.add_argument("--stage", choices=("all", "static"), default="all", help=argparse.SUPPRESS)
  p.add_argument("--profile_dir", default="", help="a jax.profiler trace of the server during the level "
                 "of --profile_clients clients (the server's /start_profile and /stop_profile)")
  p.add_argument("--profile_clients", type=int, default=64)
  p.add_argument("--server_timeout", type=float, default=900, help="seconds to wait for the server's warmup")
  args = p.parse_args(argv)
  if args.kernel_variant and "=" not in args.kernel_variant:
    p.error("--kernel_variant takes NAME=VALUE settings (--decode_kernels picks xla or auto)")
  return args


def levels(args) -> list[int]:
  return [int(c) for c in args.clients.split(",")]


def mix(args, n: int, seed: int) -> tuple[list[int], list[int]]:
  """n (prompt length, answer length) pairs."""
  rng = np.random.default_rng(seed)
  prompt = np.clip(rng.lognormal(np.log(args.prompt_median), 0.6, n), 16, args.max_prompt).astype(int)
  answer = np.clip(rng.lognormal(np.log(args.answer_median), 0.6, n), 16, args.max_answer).astype(int)
  return prompt.tolist(), answer.tolist()


def requests_for(args, clients: int) -> int:
  return max(args.min_requests, args.requests_per_client * clients)


# --- stage 1 (child process): the checkpoint and the static batches


def model_config(args):
  import llama_jax
  return llama_jax.preset(args.preset, dtype=args.dtype, param_dtype=args.dtype, scan_layers=False,
                          attention_impl=args.attention_impl)


def random_params(cfg):
  """The model's parameters with random weights, on the default device (committed, as a loaded
  model's are)."""
  import flax.linen as nn
  import jax
  from llama_jax.model import init_params
  return jax.device_put(jax.jit(lambda: nn.unbox(init_params(cfg, jax.random.key(0))))(), jax.devices()[0])


def make_checkpoint(args, directory: str) -> None:
  import sentencepiece as spm
  from sentencepiece import sentencepiece_model_pb2 as sp_pb2

  import llama_jax
  from llama_jax.tokenizer import Tokenizer
  cfg = model_config(args)
  os.makedirs(directory, exist_ok=True)
  corpus = os.path.join(directory, "corpus.txt")
  with open(corpus, "w") as f:
    for i in range(3000):
      f.write(f"request {i} asks the server for {i % 97} tokens of an answer, and gets them\n")
  prefix = os.path.join(directory, "sp")
  spm.SentencePieceTrainer.train(input=corpus, model_prefix=prefix, vocab_size=min(cfg.vocab_size, 512),
                                 model_type="bpe", byte_fallback=True, minloglevel=2)
  proto = sp_pb2.ModelProto()
  with open(prefix + ".model", "rb") as f:
    proto.ParseFromString(f.read())
  while len(proto.pieces) < cfg.vocab_size:  # placeholders up to the model's vocabulary
    piece = proto.pieces.add()
    piece.piece, piece.type = f"<x{len(proto.pieces)}>", sp_pb2.ModelProto.SentencePiece.USER_DEFINED
  with open(prefix + ".model", "wb") as f:
    f.write(proto.SerializeToString())
  params = random_params(cfg)
  llama_jax.Model(cfg, params, Tokenizer(prefix + ".model")).save(os.path.join(directory, "model"))


def static_stage(args) -> dict:
  """tokens/s of generate_tokens at each batch size, and the device it ran on."""
  import llama_jax
  from llama_jax.bench.common import device_info
  from llama_jax.generate import engine, generate_tokens
  checkpoint = os.path.join(args.workdir, "model")
  if not os.path.isdir(checkpoint):
    t0 = time.perf_counter()
    make_checkpoint(args, args.workdir)
    print(f"checkpoint written in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
  if args.kernel_variant:
    from decode_variants import apply  # noqa: PLC0415 (this folder's)
    apply(args.kernel_variant)
  model = llama_jax.load(checkpoint, decode_kernels=args.decode_kernels)
  params = engine.prepare_params(model.config, model.params)
  prompt_lengths, answer_lengths = mix(args, 4096, seed=1)
  p, n = int(np.mean(prompt_lengths)), int(np.mean(answer_lengths))
  rng = np.random.default_rng(2)
  out = {"static_prompt_len": p, "static_new_tokens": n}
  for b in levels(args):
    prompts = rng.integers(3, model.config.vocab_size, (b, p)).tolist()
    run = lambda: generate_tokens(model.config, params, prompts, n, temperature=args.temperature,
                                  batch_size=b, eos_ids=())
    run()  # compilation
    t0 = time.perf_counter()
    made = run()
    seconds = time.perf_counter() - t0
    assert all(len(row) == n for row in made), "a static row stopped early"
    out[f"static_{b}_tokens_per_s"] = round(b * n / seconds, 1)
    print(f"static batch {b}: {b * n / seconds:.1f} tokens/s", file=sys.stderr, flush=True)
  return {**out, **device_info()}


# --- stage 2: the server; stage 3: the load


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# The server with decode_block's constants set first (--kernel_variant): argv[1] the variant, the
# rest the server's own arguments.
SERVE_WITH_VARIANT = (
    "import runpy, sys; sys.path.insert(0, 'benchmarks'); from decode_variants import apply; "
    "apply(sys.argv[1]); sys.argv = ['llama_jax.serve'] + sys.argv[2:]; "
    "runpy.run_module('llama_jax.serve', run_name='__main__', alter_sys=True)")


def start_server(args, port: int) -> subprocess.Popen:
  launch = ["-c", SERVE_WITH_VARIANT, args.kernel_variant] if args.kernel_variant else ["-m", "llama_jax.serve"]
  cmd = [sys.executable, *launch, "--checkpoint", os.path.join(args.workdir, "model"),
         "--port", str(port), "--max_batch", str(max(levels(args))), "--max_len", str(args.max_len),
         "--decode_steps", str(args.decode_steps), "--decode_attention", args.decode_attention,
         "--decode_kernels", args.decode_kernels, "--warmup", "--model_name", "bench",
         "--compilation_cache", "",  # server_ready_s: a cold warmup, whatever ran before on this machine
         "--log_level", "warning"] + (["--profile_dir", args.profile_dir] if args.profile_dir else [])
  return subprocess.Popen(cmd, cwd=REPO, stdout=sys.stderr)  # stdout: the table only


def wait_ready(server: subprocess.Popen, url: str, timeout: float) -> float:
  import httpx
  t0 = time.perf_counter()
  while time.perf_counter() - t0 < timeout:
    if server.poll() is not None:
      raise SystemExit(f"the server exited with code {server.returncode} before it was ready")
    try:
      if httpx.get(url + "/health", timeout=5).status_code == 200:
        return time.perf_counter() - t0
    except httpx.HTTPError:
      pass
    time.sleep(1)
  raise SystemExit(f"the server was not ready after {timeout:.0f}s")


async def one_request(client, url: str, prompt: list[int], max_tokens: int, temperature: float) -> dict:
  body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature,
          "stream": True, "ignore_eos": True}
  t0 = time.perf_counter()
  first, tokens, first_at = None, 0, None
  async with client.stream("POST", url + "/v1/completions", json=body) as response:
    if response.status_code != 200:
      raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread()).decode()[:500]}")
    async for line in response.aiter_lines():
      if not line.startswith("data: ") or line == "data: [DONE]":
        continue
      chunk = json.loads(line[6:])
      if "error" in chunk:
        raise RuntimeError(chunk["error"]["message"])
      if first is None:
        first_at = time.perf_counter()
        first = first_at - t0
      if chunk.get("usage"):
        tokens = chunk["usage"]["completion_tokens"]
  if tokens != max_tokens:
    raise RuntimeError(f"asked for {max_tokens} tokens, got {tokens}")
  return {"ttft": first, "tokens": tokens, "first_at": first_at, "end_at": time.perf_counter()}


def cpu_seconds(pid: int) -> float:
  """User + system CPU time of a process and its threads (Linux /proc), seconds."""
  with open(f"/proc/{pid}/stat") as f:
    fields = f.read().rsplit(")", 1)[1].split()
  return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load_level(url: str, clients: int, prompts, answers, temperature: float,
                     server_pid: int | None = None) -> dict:
  """One level; beside the rates, the CPU each side used over it (a share of one core: above ~0.9
  for the clients, they, not the server, would set the pace)."""
  import httpx
  queue = list(zip(prompts, answers))[::-1]
  results = []
  limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
  async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:

    last_sent = [0.0]

    async def worker():
      while queue:
        prompt, answer = queue.pop()
        last_sent[0] = time.perf_counter()
        results.append(await one_request(client, url, prompt, answer, temperature))

    t0, cpu0 = time.perf_counter(), time.process_time()
    server_cpu0 = cpu_seconds(server_pid) if server_pid else 0.0
    await asyncio.gather(*(worker() for _ in range(clients)))
    seconds = time.perf_counter() - t0
    client_cpu = time.process_time() - cpu0
    server_cpu = cpu_seconds(server_pid) - server_cpu0 if server_pid else float("nan")
  ttft = np.asarray([r["ttft"] for r in results])
  total = sum(r["tokens"] for r in results)
  return {"clients": clients, "requests": len(results), "tokens": total, "seconds": round(seconds, 2),
          "tokens_per_s": round(total / seconds, 1),
          "steady_tokens_per_s": round(steady_rate(results, t0, last_sent[0]), 1),
          "ttft_p50_ms": round(1000 * float(np.percentile(ttft, 50)), 1),
          "ttft_p99_ms": round(1000 * float(np.percentile(ttft, 99)), 1),
          "client_cpu_share": round(client_cpu / seconds, 3),
          "server_cpu_share": round(server_cpu / seconds, 3)}


def steady_rate(results: list[dict], start: float, last_sent: float) -> float:
  """Tokens/s while every client had a request in flight (from the start to the moment the last
  request was sent; after it the batch drains). A request's tokens are counted as made evenly
  between its first token and its end."""
  made = 0.0
  for r in results:
    span = max(r["end_at"] - r["first_at"], 1e-9)
    inside = min(r["end_at"], last_sent) - r["first_at"]
    made += 1 + (r["tokens"] - 1) * min(max(inside / span, 0.0), 1.0) if r["first_at"] <= last_sent else 0
  return made / max(last_sent - start, 1e-9)


WORK = ("decode_calls", "decode_steps", "live_slot_steps", "row_steps", "attend_steps", "prefill_calls",
        "prefill_tokens_padded", "prompt_tokens", "round_s", "device_wait_s")


def engine_work(before: dict, after: dict, seconds: float) -> dict:
  """What the scheduler did during a level (its /health counters' differences): steps per decode
  call, the share of computed rows that were live slots, the mean attention window, prefill calls
  and padding, and how the scheduler thread's time split: blocked on the device, working, idle."""
  d = {k: after[k] - before[k] for k in WORK}
  calls, steps = max(d["decode_calls"], 1), max(d["decode_steps"], 1)
  wait, busy = d["device_wait_s"], d["round_s"] - d["device_wait_s"]
  return {"decode_calls": d["decode_calls"], "steps_per_call": round(d["decode_steps"] / calls, 2),
          "live_rows_share": round(d["live_slot_steps"] / max(d["row_steps"], 1), 3),
          "mean_rows": round(d["row_steps"] / steps, 1), "mean_window": round(d["attend_steps"] / steps, 1),
          "prefill_calls": d["prefill_calls"], "prompt_tokens": d["prompt_tokens"],
          "prefill_padding": round(d["prefill_tokens_padded"] / max(d["prompt_tokens"], 1), 3),
          "host_wait_share": round(wait / seconds, 3), "host_work_share": round(busy / seconds, 3),
          "ms_per_decode_call": round(1000 * seconds / calls, 2)}


def token_prompts(lengths: list[int], vocab: int, seed: int) -> list[list[int]]:
  rng = np.random.default_rng(seed)
  return [[1] + rng.integers(3, vocab, n - 1).tolist() for n in lengths]


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.stage == "static":
    print(json.dumps(static_stage(args)))
    return 0
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
  static = [sys.executable, os.path.abspath(__file__), *(argv or sys.argv[1:]), "--stage", "static"]
  child = subprocess.run(static, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
  if child.returncode:
    raise SystemExit(f"the static stage failed with code {child.returncode}")
  result = json.loads(child.stdout.strip().splitlines()[-1])
  with open(os.path.join(args.workdir, "model", "model_config.json")) as f:
    vocab = json.load(f)["vocab_size"]
  import httpx
  port = free_port()
  url = f"http://127.0.0.1:{port}"
  server = start_server(args, port)
  try:
    result["server_ready_s"] = round(wait_ready(server, url, args.server_timeout), 1)
    warm_p, warm_a = mix(args, 8, seed=99)
    asyncio.run(load_level(url, 4, token_prompts(warm_p, vocab, 99), warm_a, args.temperature))
    rows = []
    for clients in levels(args):
      p, a = mix(args, requests_for(args, clients), seed=clients)
      profile = args.profile_dir and clients == args.profile_clients
      if profile:
        httpx.post(url + "/start_profile", timeout=60).raise_for_status()
      before = httpx.get(url + "/health", timeout=10).json()
      row = asyncio.run(load_level(url, clients, token_prompts(p, vocab, clients), a, args.temperature,
                                   server.pid))
      row["engine"] = engine_work(before, httpx.get(url + "/health", timeout=10).json(), row["seconds"])
      if profile:
        httpx.post(url + "/stop_profile", timeout=300).raise_for_status()
      row["static_tokens_per_s"] = result[f"static_{clients}_tokens_per_s"]
      row["vs_static"] = round(row["tokens_per_s"] / row["static_tokens_per_s"], 3)
      row["steady_vs_static"] = round(row["steady_tokens_per_s"] / row["static_tokens_per_s"], 3)
      print(f"{clients} clients: {json.dumps(row)}", file=sys.stderr, flush=True)
      rows.append(row)
  finally:
    server.terminate()
    server.wait(timeout=60)
  print(f"\n{result['device']}, {args.preset} shape, random weights, {args.dtype}; static batch: prompts of "
        f"{result['static_prompt_len']} tokens, {result['static_new_tokens']} new tokens each\n")
  print("| clients | requests | server tokens/s (all) | (steady) | TTFT p50 ms | TTFT p99 ms | "
        "static batch tokens/s | server / static (all) | (steady) |")
  print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
  for r in rows:
    print(f"| {r['clients']} | {r['requests']} | {r['tokens_per_s']:,.0f} | "
          f"{r['steady_tokens_per_s']:,.0f} | {r['ttft_p50_ms']:,.1f} | {r['ttft_p99_ms']:,.1f} | "
          f"{r['static_tokens_per_s']:,.0f} | {r['vs_static']:.2f} | {r['steady_vs_static']:.2f} |")
  print("\nthe scheduler during each level (engine_work):")
  for r in rows:
    print(f"  {r['clients']} clients: {json.dumps(r['engine'])}")
  goal = [r for r in rows if r["clients"] == 64]
  if goal:
    print(f"\ngoal (64 clients >= 0.70 of the static batch): all {goal[0]['vs_static']:.2f}, "
          f"steady {goal[0]['steady_vs_static']:.2f}")
  print(json.dumps({**result, "levels": rows, "args": vars(args)}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
