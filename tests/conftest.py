import os
import tempfile


def _xla_defines(flag: str) -> bool:
  """Whether the installed jaxlib's XLA has this flag (a name XLA_FLAGS gives that XLA does not
  define aborts the process), read from the flag's name in its libraries, before JAX starts."""
  import importlib.util
  import mmap
  import pathlib
  root = pathlib.Path(importlib.util.find_spec("jaxlib").origin).parent
  for library in root.rglob("*.so"):
    if library.stat().st_size == 0:  # mmap refuses empty files
      continue
    with open(library, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
      if m.find(flag.encode() + b"\0") >= 0:
        return True
  return False


# Tests compile many small programs and run each a few times: LLVM's optimisation of the CPU code
# costs more than it saves (measured on 2 cores: tests/test_model.py 89 s -> 45 s), and so do
# XLA:CPU's MLIR fusion emitters against its older elemental ones (jaxlib 0.10.2, each file alone,
# compilation cache empty: tests/test_model.py 46 s -> 31 s, test_decode_kernels.py 96 s -> 61 s).
FAST_COMPILE = "--xla_backend_optimization_level=0" + (
    " --xla_cpu_use_fusion_emitters=false" if _xla_defines("xla_cpu_use_fusion_emitters") else "")


def xla_flags(devices: int = 8) -> str:
  """XLA_FLAGS for a test process (subprocesses of the tests too): emulated CPU devices, quick compiles."""
  return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"


# Tests run on the CPU in float32 matmul precision; several tests need 8 emulated devices. The flag
# must be set before JAX initialises its backends, so here, before anything imports jax.
os.environ.setdefault("XLA_FLAGS", xla_flags(8))
# One persistent compilation cache for the test processes, their subprocesses (train.py runs) and
# later runs: the same small programs compile in many of them (measured: tests/test_train_step.py
# 27 s cold, 10 s warm). Keys hash the program, the flags and the JAX version, so nothing stale is read.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"llama_jax_tests_jax_cache_{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Drops JAX's in-memory compiled programs after each test module.

  Every live XLA:CPU executable holds about three memory mappings (its code and data), and JAX's
  caches keep every program a worker ever ran: a pytest-xdist worker reached 59,634 mappings by the
  end of the suite, against Linux's default `vm.max_map_count` of 65,530. Past it, XLA:CPU logs "LLVM
  compilation error: Cannot allocate memory" and the process dies of a segmentation fault
  (reproduced with the limit lowered to 2,500; in CI, in whichever test ran there, reading a program
  back from the compilation cache). Cleared, a module's programs are unmapped (a worker's peak:
  17,922-21,232 in four runs), and the next module that needs one reads it back from the persistent cache.
  """
  yield
  jax.clear_caches()


@pytest.fixture(autouse=True)
def _optimised_programs(request):
  """Programs compiled for a test marked `optimised` get LLVM's full optimisation back.

  FAST_COMPILE's level 0 suits the many programs that run a few times (the fast tests of twelve
  files, compilation cache empty, one process: 233 s at level 0, 491 s at 3 with this fixture on
  every test), but makes loops that run long about six times slower: a decode through Pallas'
  interpreter (tests/test_decode_kernels.py) ran 23 s at level 0 against 3 s at XLA's default 3,
  and took 30 s against 13 s with its compilations. XLA reads the level per compilation (a compile
  option over XLA_FLAGS', which the persistent cache keys on). JAX's in-memory programs are
  cleared before and after the test: none compiled at the other level is reused.
  """
  if request.node.get_closest_marker("optimised") is None:
    yield
    return
  from jax._src import compiler
  original = getattr(compiler, "get_compile_options", None)
  if original is None:  # another JAX's internals: the test runs as it is, only slower
    yield
    return

  def with_full_optimisation(*args, env_options_overrides=None, **kwargs):
    overrides = {**(env_options_overrides or {}), "xla_backend_optimization_level": "3"}
    return original(*args, env_options_overrides=overrides, **kwargs)

  jax.clear_caches()
  compiler.get_compile_options = with_full_optimisation
  try:
    yield
  finally:
    compiler.get_compile_options = original
    jax.clear_caches()


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


# --- Hugging Face tokenizer folders, built with the `tokenizers` library (no download)

HF_WORDS = ("the cat sat on a mat dog ran to big small red blue tree house hello world what is color "
            "of sky sea grass green name fruit apple say good morning how are you fine thanks 你好 世界 "
            "中文 😀 🎉 café naïve def return self").split()
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3_CHAT = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
               "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
               "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
               "{{ content }}{% endfor %}{% if add_generation_prompt %}"
               "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
LLAMA2_CHAT = ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message "
               "= messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false "
               "%}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 "
               "== 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
               "{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + "
               "system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = "
               "message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + "
               "content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() "
               "+ ' ' + eos_token }}{% endif %}{% endfor %}")
ZEPHYR_CHAT = ("{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + "
               "message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + "
               "message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  "
               "+ message['content'] + eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n"
               "{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")


def _hf_corpus():
  import random
  rng = random.Random(0)
  lines = [" ".join(rng.choice(HF_WORDS) for _ in range(rng.randint(3, 15))) for _ in range(1500)]
  return lines + ["def f(x):\n    return x  +  1\n\n\tindent"] * 30 + ["user assistant system"] * 30


def write_hf_tokenizer(folder, style: str, vocab_size: int = 500, **config):
  """A tokenizer folder in the style of a real model family, trained on a small corpus:
    llama3  byte-level BPE with Llama 3's pre-tokenizer, <|begin_of_text|> prepended, header tokens,
            eos <|eot_id|> and generation_config.json's two EOS ids, the Llama 3 chat template
    chatml  GPT-2 byte-level BPE (tokenizer_class GPT2Tokenizer, as SmolLM2), <|im_start|> /
            <|im_end|> / <|endoftext|>, no BOS added, the ChatML template
    llama2  SentencePiece-style BPE with byte fallback (Llama 2's tokenizer.json layout: normalizer
            prepending "▁", <0xXX> byte pieces at ids 3..258), tokenizer_class LlamaTokenizerFast,
            <s> prepended, the Llama 2 chat template
  `config` entries go into tokenizer_config.json (e.g. legacy, tokenizer_class, chat_template)."""
  import json
  import os

  from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
  from tokenizers import processors, trainers
  os.makedirs(folder, exist_ok=True)
  corpus = _hf_corpus()
  if style in ("llama3", "chatml"):
    tok = Tokenizer(models.BPE(ignore_merges=style == "llama3"))
    if style == "llama3":
      tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"),
                                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
      tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if style == "llama3":
      specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
      tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
      bos = tok.token_to_id(specials[0])
      tok.post_processor = processors.Sequence([
          processors.ByteLevel(trim_offsets=False),
          processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                                        special_tokens=[("<|begin_of_text|>", bos)])])
      cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": specials[0], "eos_token": "<|eot_id|>",
             "chat_template": LLAMA3_CHAT, "clean_up_tokenization_spaces": False}
      generation = {"bos_token_id": bos, "eos_token_id": [tok.token_to_id(specials[1]), tok.token_to_id("<|eot_id|>")],
                    "do_sample": True, "temperature": 0.6, "top_p": 0.9}
    else:
      specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
      tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
      tok.post_processor = processors.ByteLevel(trim_offsets=False)
      cfg = {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
             "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>", "add_prefix_space": False,
             "chat_template": CHATML, "clean_up_tokenization_spaces": False}
      generation = {"bos_token_id": tok.token_to_id("<|im_start|>"), "eos_token_id": tok.token_to_id("<|im_end|>")}
    tok.save(os.path.join(folder, "tokenizer.json"))
  elif style == "llama2":
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    byte_pieces = [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, show_progress=False, special_tokens=["<unk>", "<s>", "</s>"] + byte_pieces))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    path = os.path.join(folder, "tokenizer.json")
    tok.save(path)
    with open(path, encoding="utf-8") as f:
      spec = json.load(f)
    # Llama 2's byte pieces are vocabulary entries, not added tokens.
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] in ("<unk>", "<s>", "</s>")]
    with open(path, "w", encoding="utf-8") as f:
      json.dump(spec, f, ensure_ascii=False)
    cfg = {"tokenizer_class": "LlamaTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
           "add_bos_token": True, "add_eos_token": False, "legacy": False, "pad_token": None,
           "chat_template": LLAMA2_CHAT, "clean_up_tokenization_spaces": False}
    generation = {"bos_token_id": 1, "eos_token_id": 2}
  else:
    raise ValueError(style)
  cfg.update(config)
  with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump({k: v for k, v in cfg.items() if v is not ...}, f, ensure_ascii=False)  # ...: leave the key out
  with open(os.path.join(folder, "generation_config.json"), "w") as f:
    json.dump(generation, f)
  if not os.path.exists(os.path.join(folder, "config.json")):  # what AutoTokenizer reads the model type from
    with open(os.path.join(folder, "config.json"), "w") as f:
      json.dump({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                 "vocab_size": max(tok.get_vocab().values()) + 1}, f)
  return folder
