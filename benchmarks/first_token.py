"""Time from `python generate.py` starting to its first generated character, for a saved checkpoint
of a config's shape (random weights, float32 parameters as a training run saves them).

  python benchmarks/first_token.py --config configs/tinyllama_1b.py --workdir /tmp/first_token

Runs generate.py three times in fresh processes: without a persistent compilation cache, then twice
with JAX_COMPILATION_CACHE_DIR set (the first run fills it, the second reads it). Prints one JSON
line per run: seconds to the first character after the echoed prompt, and to the end.
"""

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "def fibonacci(n):"


def make_checkpoint(config_path: str, directory: str) -> None:
  import flax.linen as nn
  import jax
  import sentencepiece as spm
  from ml_collections import config_flags  # noqa: F401  (the config file imports it)

  import llama_jax
  from llama_jax.config import ModelConfig
  from llama_jax.model import init_params
  sys.path.insert(0, REPO)
  import importlib.util
  spec = importlib.util.spec_from_file_location("cfg", config_path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = ModelConfig.from_dict(module.get_config().model)
  params = jax.jit(lambda: nn.unbox(init_params(cfg, jax.random.key(0))))()
  os.makedirs(directory, exist_ok=True)
  text = os.path.join(directory, "text.txt")
  with open(text, "w") as f:  # any text: the tokenizer only has to exist
    for i in range(3000):
      f.write(f"def f{i}(x): return x * {i} + {i % 7}  # the quick brown fox {i}\n")
  spm.SentencePieceTrainer.train(input=text, model_prefix=os.path.join(directory, "sp"), vocab_size=1000,
                                 model_type="bpe", byte_fallback=True, minloglevel=2)
  # Pad the vocabulary to the model's with placeholder pieces, so that any id a random model draws
  # decodes to something.
  from sentencepiece import sentencepiece_model_pb2 as sp_pb2
  proto = sp_pb2.ModelProto()
  with open(os.path.join(directory, "sp.model"), "rb") as f:
    proto.ParseFromString(f.read())
  while len(proto.pieces) < cfg.vocab_size:
    piece = proto.pieces.add()
    piece.piece, piece.type, piece.score = f"<x{len(proto.pieces)}>", sp_pb2.ModelProto.SentencePiece.USER_DEFINED, 0.0
  with open(os.path.join(directory, "sp.model"), "wb") as f:
    f.write(proto.SerializeToString())
  from llama_jax.tokenizer import Tokenizer
  tokenizer = Tokenizer(os.path.join(directory, "sp.model"))
  llama_jax.Model(cfg, params, tokenizer).save(os.path.join(directory, "model"))


def run_generate(checkpoint: str, env: dict, new_tokens: int) -> dict:
  cmd = [sys.executable, os.path.join(REPO, "generate.py"), "--checkpoint", checkpoint, "--prompt", PROMPT,
         "--max_new_tokens", str(new_tokens), "--temperature", "0"]
  start = time.perf_counter()
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  seen, first = b"", None
  while True:
    byte = proc.stdout.read(1)
    if not byte:
      break
    seen += byte
    if first is None and len(seen) > len(PROMPT.encode()):
      first = time.perf_counter() - start
  proc.wait()
  total = time.perf_counter() - start
  if proc.returncode:
    raise SystemExit(f"generate.py failed ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}")
  return {"first_token_s": round(first, 2) if first else None, "total_s": round(total, 2),
          "new_tokens": new_tokens}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/tinyllama_1b.py")
  p.add_argument("--workdir", default="/tmp/first_token")
  p.add_argument("--new_tokens", type=int, default=64)
  args = p.parse_args()
  checkpoint = os.path.join(args.workdir, "model")
  if not os.path.isdir(checkpoint):
    t0 = time.perf_counter()
    make_checkpoint(args.config, args.workdir)
    print(json.dumps({"checkpoint_written_s": round(time.perf_counter() - t0, 1)}), flush=True)
  cache = os.path.join(args.workdir, "jax_cache")
  base = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  for label, env in (("no compilation cache", base),
                     ("cache, first run (fills it)", dict(base, JAX_COMPILATION_CACHE_DIR=cache)),
                     ("cache, second run", dict(base, JAX_COMPILATION_CACHE_DIR=cache))):
    print(json.dumps({"run": label, **run_generate(checkpoint, env, args.new_tokens)}), flush=True)


if __name__ == "__main__":
  main()
