"""The reference people would otherwise pick: transformers' PyTorch LLaMA, TinyLlama-1.1B shape.

  python benchmarks/reference_torch.py train [--compile]     bf16 autocast, SDPA, fused AdamW, batch 8 x 2048
  python benchmarks/reference_torch.py decode --batch_size B  prompt 128 + 256 new tokens, bf16, static cache

Prints one JSON line. Random weights; no download.
"""

import argparse
import json
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

TINYLLAMA = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                 rms_norm_eps=1e-5, attn_implementation="sdpa")


def train(args):
  model = LlamaForCausalLM(LlamaConfig(**TINYLLAMA)).cuda()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
  step_model = torch.compile(model) if args.compile else model
  tokens = torch.randint(0, 32000, (args.batch_size, args.seq_len + 1), device="cuda")

  def step():
    with torch.autocast("cuda", dtype=torch.bfloat16):
      loss = step_model(input_ids=tokens[:, :-1], labels=tokens[:, 1:]).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  for _ in range(args.warmup):
    step()
  torch.cuda.synchronize()
  t0 = time.perf_counter()
  for _ in range(args.steps):
    loss = step()
  loss.item()
  step_s = (time.perf_counter() - t0) / args.steps
  tokens_per_s = args.batch_size * args.seq_len / step_s
  n = sum(p.numel() for p in model.parameters()) - 32000 * 2048
  flops = (6 * n + 6 * 22 * args.seq_len * 2048) * tokens_per_s
  return {"reference": "transformers" + (" + torch.compile" if args.compile else " eager"),
          "tokens_per_s": round(tokens_per_s, 1), "step_s": round(step_s, 4), "mfu": round(flops / 989e12, 4),
          "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def decode(args):
  model = LlamaForCausalLM(LlamaConfig(**TINYLLAMA)).cuda().to(torch.bfloat16).eval()
  prompt = torch.randint(0, 32000, (args.batch_size, args.prompt_len), device="cuda")
  kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
  if args.cache == "static":
    kwargs["cache_implementation"] = "static"
  with torch.no_grad():
    for _ in range(2):
      model.generate(prompt, **kwargs)
    torch.cuda.synchronize()
    times = []
    for _ in range(3):
      t0 = time.perf_counter()
      model.generate(prompt, **kwargs)
      torch.cuda.synchronize()
      times.append(time.perf_counter() - t0)
  t = sorted(times)[1]
  return {"reference": f"transformers generate ({args.cache} cache)", "batch_size": args.batch_size,
          "tokens_per_s": round(args.batch_size * args.new_tokens / t, 1),
          "ms_per_token": round(1000 * t / args.new_tokens, 3)}


if __name__ == "__main__":
  parser = argparse.ArgumentParser()
  parser.add_argument("mode", choices=["train", "decode"])
  parser.add_argument("--compile", action="store_true")
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--seq_len", type=int, default=2048)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--prompt_len", type=int, default=128)
  parser.add_argument("--new_tokens", type=int, default=256)
  parser.add_argument("--cache", choices=["dynamic", "static"], default="static")
  args = parser.parse_args()
  print(json.dumps(train(args) if args.mode == "train" else decode(args)))
