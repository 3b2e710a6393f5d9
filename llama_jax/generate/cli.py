"""`python generate.py`: text from a checkpoint — prompts in a batch, one prompt streamed, or a chat.

  python generate.py --checkpoint DIR --prompt "Once upon a time"
  python generate.py --checkpoint DIR --prompt_file prompts.jsonl --output out.jsonl
  python generate.py --checkpoint DIR --chat [--template auto|vicuna_v1.1|llama-2|chatml|raw] [--system "..."]

DIR is anything `llama_jax.load` reads: a saved model, a training workdir (its latest step), a
Hugging Face or a Meta LLaMA directory, with its tokenizer (tokenizer.json or tokenizer.model;
--tokenizer gives another). Sampling: a flag given wins; else the checkpoint's
generation_config.json (temperature, top_p, top_k, max_new_tokens; do_sample=false: greedy); else
Meta's example scripts' defaults (temperature 0.6, top-p 0.9). Generation stops at any of the
tokenizer's EOS ids (generation_config.json may list several). --chat uses the model's own chat
template when it has one (--template auto), else Vicuna v1.1. The engine is
`llama_jax.generate.engine`; chat templates are `llama_jax.tokenizer.chat`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Sequence, TextIO


class UsageError(ValueError):
  """Bad input the user can fix; reported as one line."""


class _ShowDefaults(argparse.HelpFormatter):
  """--help shows each flag's default, where it has one."""

  def _get_help_string(self, action):
    default = action.default
    if default is None or default is False or default == [] or default is argparse.SUPPRESS or (
        "%(default)" in (action.help or "")):
      return action.help
    return f"{action.help or ''} (default: %(default)s)".strip()


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  from llama_jax.tokenizer import chat
  p = argparse.ArgumentParser(prog="generate.py", description=__doc__.splitlines()[0],
                              formatter_class=_ShowDefaults)
  p.add_argument("--checkpoint", required=True, help="model directory or training workdir")
  p.add_argument("--tokenizer", help="a tokenizer.json, a SentencePiece .model or a folder holding one "
                 "(default: the checkpoint's own)")
  p.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for a batch")
  p.add_argument("--prompt_file", help="prompts, one per line, or .jsonl with a 'prompt' field")
  p.add_argument("--output", help="write results as jsonl to this file, or '-' for stdout")
  p.add_argument("--max_new_tokens", type=int,
                 help="tokens to generate at most (and no further than the model's context); default: "
                      f"generation_config.json's, else {SAMPLING_DEFAULTS['max_new_tokens']}")
  p.add_argument("--temperature", type=float,
                 help=f"0: greedy; default: generation_config.json's, else {SAMPLING_DEFAULTS['temperature']}")
  p.add_argument("--top_p", type=float, help="nucleus sampling: the smallest set of this mass; default: "
                 f"generation_config.json's, else {SAMPLING_DEFAULTS['top_p']}")
  p.add_argument("--top_k", type=int, help="0: no top-k cut; default: generation_config.json's, else 0")
  p.add_argument("--seed", type=int, default=0, help="sampling seed")
  p.add_argument("--batch_size", type=int, default=16, help="prompts decoded together")
  p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                 help="compute dtype (default: the checkpoint's)")
  p.add_argument("--tensor", type=int, default=1, help="split the model over this many devices")
  p.add_argument("--decode_kernels", choices=("auto", "xla", "pallas"),
                 help="one prompt's decode steps: each block as five fused Pallas kernels (pallas) or "
                      "XLA's (xla); default: the checkpoint's (auto: pallas on one GPU)")
  p.add_argument("--no_stream", action="store_true", help="print a single prompt's text at the end")
  p.add_argument("--stats", action="store_true", help="report tokens per second on stderr")
  p.add_argument("--chat", action="store_true", help="interactive multi-turn chat on stdin")
  p.add_argument("--template", default=chat.AUTO, choices=chat.NAMES,
                 help="the conversation template of --chat; auto: the model's own, else vicuna_v1.1")
  p.add_argument("--system", help="replace the template's system line")
  return p.parse_args(argv)


def read_prompts(args) -> list[str]:
  prompts = list(args.prompt)
  if args.prompt_file:
    prompts += _read_prompt_file(args.prompt_file)
  for i, text in enumerate(prompts):
    if not text.strip():
      raise UsageError(f"prompt {i + 1} is empty")
  return prompts


def _read_prompt_file(path: str) -> list[str]:
  if not os.path.isfile(path):
    raise UsageError(f"--prompt_file {path}: no such file")
  with open(path, encoding="utf-8") as f:
    lines = f.read().splitlines()
  if not path.endswith(".jsonl"):
    return [line for line in lines if line.strip()]
  prompts = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise UsageError(f"{path}:{number}: not JSON ({e.msg})") from None
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
      raise UsageError(f"{path}:{number}: needs a string field 'prompt'")
    if not record["prompt"].strip():
      raise UsageError(f"{path}:{number}: the prompt is empty")
    prompts.append(record["prompt"])
  return prompts


def load_model(args):
  import llama_jax
  if not os.path.exists(args.checkpoint):
    raise UsageError(f"--checkpoint {args.checkpoint}: no such file or directory")
  if args.tokenizer and not os.path.exists(args.tokenizer):
    raise UsageError(f"--tokenizer {args.tokenizer}: no such file or directory")
  overrides = {"decode_kernels": args.decode_kernels} if args.decode_kernels else {}
  model = llama_jax.load(args.checkpoint, dtype=args.dtype, tokenizer=args.tokenizer, **overrides)
  if model.tokenizer is None:
    raise UsageError(f"{args.checkpoint} has no tokenizer (tokenizer.json or tokenizer.model); pass "
                     "--tokenizer PATH (a tokenizer.json, a SentencePiece .model or a folder holding one)")
  return model


SAMPLING_DEFAULTS = dict(max_new_tokens=256, temperature=0.6, top_p=0.9, top_k=0)  # Meta's examples


def resolve_sampling(args, generation_config: dict) -> None:
  """Each sampling flag left unset takes generation_config.json's value, else SAMPLING_DEFAULTS;
  do_sample=false there means greedy (temperature 0), as transformers reads it."""
  from_file = {k: generation_config[k] for k in SAMPLING_DEFAULTS if generation_config.get(k) is not None}
  if generation_config.get("do_sample") is False:
    from_file["temperature"] = 0.0
  for name, default in SAMPLING_DEFAULTS.items():
    if getattr(args, name) is None:
      setattr(args, name, type(default)(from_file.get(name, default)))


def make_mesh(args, config):
  if args.tensor <= 1:
    return None
  import jax
  from llama_jax import sharding
  if args.tensor > jax.device_count():
    raise UsageError(f"--tensor {args.tensor}: only {jax.device_count()} devices")
  mesh = sharding.make_mesh(data=1, fsdp=1, tensor=args.tensor, devices=jax.devices()[:args.tensor])
  sharding.check_divisible(mesh, 1, config.n_heads, config.n_kv_heads)
  return mesh


def check_lengths(model, prompts: list[str]) -> list[list[int]]:
  ids = model.tokenizer.encode_batch(prompts)
  for i, row in enumerate(ids):
    if len(row) > model.config.max_seq_len:
      raise UsageError(f"prompt {i + 1} is {len(row)} tokens long, more than the model's context of "
                       f"{model.config.max_seq_len} tokens")
  return ids


def note_context_limit(max_new_tokens: int, context: int, longest_prompt: int | None = None) -> None:
  """Says once, on stderr, when generation will stop at the model's context before
  --max_new_tokens (it would otherwise stop there silently). `longest_prompt`: None in a chat."""
  if longest_prompt is None and max_new_tokens >= context:
    print(f"note: --max_new_tokens {max_new_tokens} goes past the model's context of {context} tokens: "
          "each answer stops at the context", file=sys.stderr)
  elif longest_prompt is not None and longest_prompt + max_new_tokens > context + 1:
    # The last new token needs no place in the context (nothing is fed back after it): a prompt of
    # n tokens gets up to context - n + 1 (`generator.make_batch`).
    print(f"note: --max_new_tokens {max_new_tokens} goes past the model's context of {context} tokens: "
          f"a prompt of {longest_prompt} tokens gets at most {max(context - longest_prompt + 1, 0)} new ones",
          file=sys.stderr)


def run_prompts(args, model, mesh, prompts, out: TextIO) -> None:
  from llama_jax.generate import TextStreamer, generate
  ids = check_lengths(model, prompts)
  note_context_limit(args.max_new_tokens, model.config.max_seq_len, max(map(len, ids)))
  eos_ids = list(model.tokenizer.eos_ids)
  options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                 top_k=args.top_k, seed=args.seed, batch_size=args.batch_size, mesh=mesh)
  start = time.perf_counter()
  if len(prompts) == 1 and not args.output and not args.no_stream:
    out.write(prompts[0])
    out.flush()

    def write(text):
      out.write(text)
      out.flush()

    outputs = generate(model, [ids[0]], stream=TextStreamer(model.tokenizer, write, eos_ids, ids[0]),
                       **options)
    out.write("\n")
  else:
    outputs = generate(model, ids, **options)
  seconds = time.perf_counter() - start
  new = [row[len(p):] for row, p in zip(outputs, ids)]
  texts = [model.tokenizer.decode_continuation(p, [t for t in row if t not in eos_ids])
           for p, row in zip(ids, new)]
  if args.output:
    records = [{"prompt": p, "completion": t, "num_tokens": len(n), "stopped_at_eos": bool(n) and n[-1] in eos_ids}
               for p, t, n in zip(prompts, texts, new)]
    _write_jsonl(args.output, records, out)
  elif len(prompts) > 1 or args.no_stream:
    for prompt, text in zip(prompts, texts):
      out.write(f"{prompt}{text}\n---\n")
  if args.stats:
    total = sum(map(len, new))
    print(f"{total} tokens in {seconds:.2f}s ({total / seconds:.1f} tokens/s, compile included)",
          file=sys.stderr)


def _write_jsonl(path: str, records: list[dict], out: TextIO) -> None:
  lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
  if path == "-":
    out.write(lines)
    return
  try:
    with open(path, "w", encoding="utf-8") as f:
      f.write(lines)
  except OSError as e:
    raise UsageError(f"--output {path}: {e.strerror}") from None


def fit_history(template, history, user, tokenizer, budget: int):
  """The prompt ids for `user` after `history`, dropping the oldest (user, assistant) pairs until
  the prompt leaves `budget` tokens free; None if the message alone does not fit the context."""
  while True:
    messages = history + [{"role": "user", "content": user}]
    ids = template.encode_prompt(messages, tokenizer)
    if len(ids) <= budget or not history:
      return (ids, history) if len(ids) <= budget else (None, history)
    history = history[2:]


def run_chat(args, model, mesh, stdin: TextIO, out: TextIO) -> None:
  from llama_jax.generate import TextStreamer
  from llama_jax.generate.generator import generate_tokens
  from llama_jax.tokenizer import chat
  tok = model.tokenizer
  template = chat.template_for(tok, args.template).with_system(args.system)
  stop_ids = template.stop_ids(tok)
  # Leave room for a full answer when the context allows it; a long message still gets the rest.
  budget = max(model.config.max_seq_len - args.max_new_tokens, 1)
  note_context_limit(args.max_new_tokens, model.config.max_seq_len)
  interactive = stdin.isatty()
  history: list[dict] = []
  turn = 0
  while True:
    if interactive:
      out.write(f"{template.roles[0]}: ")
      out.flush()
    line = stdin.readline()
    if not line:
      break
    user = line.strip()
    if user in ("/exit", "/quit"):
      break
    if user == "/reset":
      history = []
      continue
    if not user:
      continue
    ids, history = fit_history(template, history, user, tok, budget)
    if ids is None:
      ids, history = fit_history(template, [], user, tok, model.config.max_seq_len)
      if ids is None:
        print(f"error: the message is longer than the model's context of {model.config.max_seq_len} "
              "tokens; not sent", file=sys.stderr)
        continue
    out.write(f"{template.roles[1]}: ")
    out.flush()

    def write(text):
      out.write(text)
      out.flush()

    # The answer alone (no prompt context): shown after the "ASSISTANT: " tag, as it is stored.
    streamer = TextStreamer(tok, write, stop_ids)
    result = generate_tokens(model.config, model.params, [ids], args.max_new_tokens,
                             temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                             seed=args.seed + turn, eos_ids=stop_ids, stream=streamer,
                             mesh=mesh or model.mesh, rules=model.rules)[0]
    streamer.flush()
    out.write("\n")
    out.flush()
    answer = tok.decode([t for t in result if t not in stop_ids]).strip()
    history = history + [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    turn += 1


def main(argv: Sequence[str] | None = None, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
  try:
    if args.chat and (args.prompt or args.prompt_file):
      raise UsageError("--chat reads its messages from stdin; drop --prompt/--prompt_file")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
      raise UsageError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    if args.batch_size < 1:
      raise UsageError(f"--batch_size must be >= 1, got {args.batch_size}")
    prompts = [] if args.chat else read_prompts(args)
    if not args.chat and not prompts:
      raise UsageError("no prompts: give --prompt, --prompt_file or --chat")
    from llama_jax.generate import sampling
    flags = [getattr(args, k) for k in ("temperature", "top_k", "top_p")]
    sampling.check(*(SAMPLING_DEFAULTS[k] if v is None else v  # the flags given, before loading
                     for k, v in zip(("temperature", "top_k", "top_p"), flags)))
    model = load_model(args)
    resolve_sampling(args, model.tokenizer.generation_config)
    sampling.check(args.temperature, args.top_k, args.top_p)
    if args.max_new_tokens < 1:
      raise UsageError(f"generation_config.json: max_new_tokens must be >= 1, got {args.max_new_tokens}")
    mesh = make_mesh(args, model.config)
    if args.chat:
      run_chat(args, model, mesh, stdin, stdout)
    else:
      run_prompts(args, model, mesh, prompts, stdout)
  except (UsageError, OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print("", file=sys.stderr)
    return 130
  return 0
