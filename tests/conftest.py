import os

# Tests run on the CPU in float32 matmul precision; several tests need 8 emulated devices. The flag
# must be set before JAX initialises its backends, so here, before anything imports jax.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def train_word_tokenizer(root, vocab_size: int):
  """A BPE sentencepiece model (byte fallback) trained on sentences of a few words; its path."""
  import random

  import sentencepiece as spm
  rng = random.Random(0)
  words = "the cat sat on a mat dog ran to big small red blue tree house".split()
  (root / "corpus.txt").write_text(
      "\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(1500)))
  spm.SentencePieceTrainer.train(input=str(root / "corpus.txt"), model_prefix=str(root / "sp"),
                                 vocab_size=vocab_size, model_type="bpe", byte_fallback=True,
                                 minloglevel=2)
  return root / "sp.model"
