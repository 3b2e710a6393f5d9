"""Hugging Face `LlamaForCausalLM` checkpoints in and out (and reward models out, as
`LlamaForSequenceClassification`).

Reads a directory with `config.json` and weights as safetensors (one file, or shards named by
`model.safetensors.index.json`) or PyTorch `pytorch_model*.bin` (read with
`torch.load(weights_only=True)`, which unpickles tensors only); writes `config.json` and safetensors
that `transformers.LlamaForCausalLM.from_pretrained` loads, with the tokenizer's files and
generation_config.json. The tensor names and layouts are
`transformers/models/llama/modeling_llama.py`'s; `layout.py` maps them onto our tree.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
from typing import Any, Iterator

import numpy as np

from llama_jax import checkpoint
from llama_jax.config import ModelConfig
from llama_jax.convert import CheckpointError, layout, safetensors_io, torch_io

log = logging.getLogger("llama_jax")

CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"
STAGING = "export.partial"  # inside the output folder: an export being written (export_hf)
BIN_INDEX = "pytorch_model.bin.index.json"
MAX_SHARD_BYTES = 5 * 10**9  # transformers' long-standing default shard size (5GB)
_LLAMA_ARCHITECTURES = {"LlamaForCausalLM", "LlamaModel"}


def _field(config: dict, name: str, file: str):
  if name not in config or config[name] is None:
    raise CheckpointError(f"{file}: missing field {name!r}")
  return config[name]


ROPE_SCALINGS = ("linear", "llama3")  # of transformers' rope types, the ones ModelConfig computes


def _rope(config: dict, file: str) -> dict:
  """ModelConfig's rope fields: rope_theta and the scaling, from `rope_parameters` (transformers >=
  5: the theta, the type and its fields together) or the top level's rope_theta and `rope_scaling`
  (older files). linear and llama3 scaling are ours; any other (dynamic, yarn, longrope) is a
  model we do not compute."""
  params, scaling = config.get("rope_parameters") or {}, config.get("rope_scaling") or {}
  for key, value in (("rope_parameters", params), ("rope_scaling", scaling)):
    if not isinstance(value, dict):
      raise CheckpointError(f"{file}: {key} must be an object, got {value!r}")
  def kind_of(rope: dict) -> str:
    return rope.get("rope_type", rope.get("type", "default"))

  def settings(rope: dict) -> dict:
    return {k: v for k, v in rope.items() if k not in ("rope_theta", "type", "rope_type")}
  if "default" not in (kind_of(params), kind_of(scaling)) and (
      kind_of(params) != kind_of(scaling) or settings(params) != settings(scaling)):
    # (transformers 5 would let rope_scaling win; a file that says two things is refused instead)
    raise CheckpointError(f"{file}: rope_parameters and rope_scaling disagree ({params} against {scaling})")
  rope = params if kind_of(params) != "default" else scaling
  kind = kind_of(rope)
  fields = {"rope_theta": float(params.get("rope_theta", config.get("rope_theta", 10000.0)))}
  if kind == "default":
    return fields
  if kind not in ROPE_SCALINGS:
    raise CheckpointError(f"{file}: rope scaling of type {kind!r} is not supported (linear and llama3 are)")

  def need(name):
    if rope.get(name) is None:
      raise CheckpointError(f"{file}: {kind} rope scaling without {name!r}")
    return rope[name]
  fields.update(rope_scaling=kind, rope_scaling_factor=float(need("factor")))
  if kind == "llama3":
    fields.update(rope_low_freq_factor=float(need("low_freq_factor")),
                  rope_high_freq_factor=float(need("high_freq_factor")),
                  rope_original_max_seq_len=int(need("original_max_position_embeddings")))
  return fields


def _rope_to_hf(cfg: ModelConfig) -> dict:
  """The scaling as transformers names it (without rope_theta); {} for plain rotary."""
  if cfg.rope_scaling == "none":
    return {}
  rope = {"rope_type": cfg.rope_scaling, "factor": cfg.rope_scaling_factor}
  if cfg.rope_scaling == "llama3":
    rope.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
                original_max_position_embeddings=cfg.rope_original_max_seq_len)
  return rope


def config_from_hf(config: dict, file: str = CONFIG) -> ModelConfig:
  """Our ModelConfig for a Hugging Face LLaMA config; other architectures and features we do not
  implement are errors naming the field."""
  model_type = config.get("model_type")
  architectures = config.get("architectures") or []
  if model_type == "llama" and architectures and not set(architectures) & _LLAMA_ARCHITECTURES:
    # A LLaMA with another head (LlamaForSequenceClassification: a reward model's export): no
    # language-model head to read.
    raise CheckpointError(f"{file}: a LLaMA with the head of {', '.join(architectures)}, not a language "
                          "model (LlamaForCausalLM); a reward model's export is read by transformers, "
                          "the reward run it came from by llama_jax.load_reward_model")
  if model_type != "llama":
    raise CheckpointError(f"{file}: model_type {model_type!r} (architectures {architectures}) is not a "
                          "LLaMA; expected model_type 'llama', LlamaForCausalLM")
  for name in ("attention_bias", "mlp_bias"):
    if config.get(name):
      raise CheckpointError(f"{file}: {name}=true is not supported (LLaMA has no biases)")
  if config.get("hidden_act", "silu") not in ("silu", "swish"):  # (transformers' ACT2FN: the same function)
    raise CheckpointError(f"{file}: hidden_act {config['hidden_act']!r} is not supported (SwiGLU uses silu)")
  hidden, heads = int(_field(config, "hidden_size", file)), int(_field(config, "num_attention_heads", file))
  head_dim = config.get("head_dim")
  if head_dim is not None and heads and int(head_dim) * heads != hidden:
    raise CheckpointError(f"{file}: head_dim {head_dim} != hidden_size / num_attention_heads "
                          f"({hidden} / {heads}) is not supported")
  try:
    return ModelConfig(
        dim=hidden,
        n_layers=int(_field(config, "num_hidden_layers", file)),
        n_heads=heads,
        n_kv_heads=int(config.get("num_key_value_heads") or heads),
        vocab_size=int(_field(config, "vocab_size", file)),
        ffn_hidden_dim=int(_field(config, "intermediate_size", file)),
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        **_rope(config, file),
        max_seq_len=int(config.get("max_position_embeddings", 2048)),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
    )
  except CheckpointError:  # a ValueError too, already naming the file
    raise
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{file}: {e}") from None


def config_to_hf(cfg: ModelConfig, dtype: str, bos_id: int | None = 1, eos_id: int | list[int] | None = 2,
                 pad_id: int | None = None) -> dict:
  """config.json for `LlamaConfig`; rope_theta and the scaling are written both ways so that
  transformers 4 (top level, `rope_scaling`) and 5 (`rope_parameters`) read them. eos_id: one id or
  several (every one ends generation)."""
  scaling = _rope_to_hf(cfg)
  return {
      "architectures": ["LlamaForCausalLM"],
      "model_type": "llama",
      "hidden_size": cfg.dim,
      "intermediate_size": cfg.hidden_dim,
      "num_hidden_layers": cfg.n_layers,
      "num_attention_heads": cfg.n_heads,
      "num_key_value_heads": cfg.n_kv_heads,
      "head_dim": cfg.head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": cfg.max_seq_len,
      "rms_norm_eps": cfg.norm_eps,
      "rope_theta": cfg.rope_theta,
      "rope_scaling": scaling or None,
      "rope_parameters": {"rope_type": "default", **scaling, "rope_theta": cfg.rope_theta},
      "tie_word_embeddings": cfg.tie_embeddings,
      "vocab_size": cfg.vocab_size,
      "attention_bias": False,
      "mlp_bias": False,
      "bos_token_id": bos_id,
      "eos_token_id": eos_id,
      "pad_token_id": pad_id,
      "initializer_range": 0.02,
      "use_cache": True,
      "torch_dtype": dtype,
      "dtype": dtype,
  }


def read_config(directory: str) -> tuple[ModelConfig, dict]:
  file = os.path.join(directory, CONFIG)
  try:
    with open(file) as f:
      raw = json.load(f)
  except FileNotFoundError:
    raise CheckpointError(f"{directory}: no {CONFIG} (not a Hugging Face checkpoint)") from None
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{file}: not valid JSON ({e})") from None
  if not isinstance(raw, dict):
    raise CheckpointError(f"{file}: not a model config (a JSON {type(raw).__name__}, not an object)")
  return config_from_hf(raw, file), raw


def _sharded_files(directory: str, index_name: str) -> list[str]:
  index = os.path.join(directory, index_name)
  try:
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise CheckpointError(f"{index}: not a shard index ({e})") from None
  files = sorted(set(weight_map.values()))
  for name in files:
    if not os.path.isfile(os.path.join(directory, name)):
      raise CheckpointError(f"{index}: names shard {name}, which is missing from {directory}")
  return [os.path.join(directory, name) for name in files]


def weight_files(directory: str) -> list[str]:
  """The weight files of a Hugging Face directory: safetensors preferred, as transformers does."""
  if os.path.isfile(os.path.join(directory, SAFETENSORS_INDEX)):
    return _sharded_files(directory, SAFETENSORS_INDEX)
  files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
  if files:
    return files
  if os.path.isfile(os.path.join(directory, BIN_INDEX)):
    return _sharded_files(directory, BIN_INDEX)
  files = sorted(glob.glob(os.path.join(directory, "pytorch_model*.bin")))
  if files:
    return files
  raise CheckpointError(f"{directory}: no weights (*.safetensors or pytorch_model*.bin)")


def _strip(name: str) -> str:
  # A bare LlamaModel saves its tensors without the "model." prefix.
  if name.startswith(("layers.", "embed_tokens.", "norm.")):
    return "model." + name
  return name


def stream(directory: str) -> Iterator[tuple[str, np.ndarray, str]]:
  """(Hugging Face name, array, file) for every tensor, one at a time."""
  for file in weight_files(directory):
    if file.endswith(".safetensors"):
      tensors = safetensors_io.iter_tensors(file)
    else:
      tensors = torch_io.iter_tensors(file)
    for name, array in tensors:
      yield _strip(name), array, file


def stored_dtype(directory: str) -> str:
  """The dtype the weights are stored in (of the first tensor), e.g. 'bfloat16'."""
  file = weight_files(directory)[0]
  if file.endswith(".safetensors"):
    infos = safetensors_io.tensor_info(file)
    return np.dtype(next(iter(infos.values()))[1]).name if infos else "float32"
  return np.dtype(next(torch_io.iter_tensors(file))[1].dtype).name


SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def generation_file(generation: dict | None) -> dict[str, str]:
  """`save_model`'s `files` that keep a model's special ids and sampling defaults (`generation`,
  as `generation_defaults` reads them) in our format when it has no tokenizer to give them: its
  generation_config.json, which `generation_defaults` reads back. (With a tokenizer, the tokenizer's
  own files say them.)"""
  return {GENERATION_CONFIG: json.dumps(generation, indent=2)} if generation else {}


def generation_defaults(directory: str, config: dict) -> dict | None:
  """A Hugging Face folder's generation_config.json with its special ids, each taken from its
  `config` (config.json, as `read_config` returns it) where generation_config.json lacks it (as
  transformers builds a GenerationConfig from a model config): what an export of its weights
  writes again when no tokenizer gives the ids (one without them would get LLaMA's 1 and 2). None
  where neither file names any."""
  ids = {k: config[k] for k in SPECIAL_IDS if config.get(k) is not None}
  try:
    with open(os.path.join(directory, GENERATION_CONFIG)) as f:
      generation = json.load(f)
  except (OSError, json.JSONDecodeError):
    generation = None
  if not isinstance(generation, dict):
    return ids or None
  return {**generation, **ids, **{k: generation[k] for k in SPECIAL_IDS if generation.get(k) is not None}}


def tokenizer_in(directory: str) -> str | None:
  """The directory if it holds a tokenizer (tokenizer.json or tokenizer.model), else None."""
  from llama_jax.tokenizer import has_tokenizer
  return directory if has_tokenizer(directory) else None


def load_hf(path: str | os.PathLike, dtype: str = "float32") -> tuple[ModelConfig, dict, str | None]:
  """(config, numpy parameter tree in `dtype`, the tokenizer's folder or None)."""
  directory = os.fspath(path)
  if not os.path.isdir(directory):
    raise CheckpointError(f"{directory}: " + ("not a directory" if os.path.exists(directory) else "no such directory"))
  cfg, _ = read_config(directory)
  cfg = cfg.replace(param_dtype=dtype)
  assembler = layout.Assembler(cfg, directory, dtype=layout.np_dtype(dtype))
  params = assembler.add_all(stream(directory)).finish()
  return cfg, params, tokenizer_in(directory)


def export_hf(config: ModelConfig, params: Any, directory: str | os.PathLike,
              tokenizer_path: str | None = None, dtype: str | None = None,
              max_shard_bytes: int = MAX_SHARD_BYTES, generation: dict | None = None) -> None:
  """Writes config.json and model.safetensors (or shards with model.safetensors.index.json when
  larger than `max_shard_bytes`), one tensor at a time, generation_config.json, and the tokenizer's
  files for transformers (`Tokenizer.save(for_transformers=True)`: a SentencePiece model also as
  a tokenizer.json). The tokenizer's BOS/EOS/pad ids go into config.json and generation_config.json
  (several EOS ids as a list), with the sampling defaults of its own generation_config.json.
  dtype: of the written weights, default the parameters' own. A quantized model is refused (float
  weights only).

  A reward model's tree (a `score` head (dim,) instead of `output`, llama_jax.align) is written as
  LlamaForSequenceClassification with one label (and no generation_config.json): transformers
  reads the score at each row's last token that is not `pad_token_id`, which is set to a token no
  answer ends with (`_score_pad_id`), so that the answer's final EOS is read, as llama_jax reads it.

  Without a tokenizer the ids come from `generation` (the source folder's, `generation_defaults`),
  else they are LLaMA's (BOS 1, EOS 2, no pad), with a warning."""
  from llama_jax import projection
  if projection.describe(params):
    raise CheckpointError("the model is quantized: a Hugging Face export takes float weights (export "
                          "the float checkpoint it was quantized from)")
  # The tokenizer first: a bad one must fail before any weight is written.
  tok = checkpoint.tokenizer_for(tokenizer_path, config.vocab_size)
  if tok is not None:
    bos, eos, generation = tok.bos_id, list(tok.eos_ids), dict(tok.generation_config)
    pad = tok.pad_id if "pad_token" in tok.special_tokens_map else None
  elif generation:
    generation = dict(generation)
    bos, eos, pad = (generation.pop(k, None) for k in SPECIAL_IDS)
    eos = [2] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]
  else:
    bos, eos, pad, generation = 1, [2], None, {}
    log.warning("%s: no tokenizer and no source ids to export with: writing LLaMA's BOS 1 and EOS 2 into "
                "config.json and generation_config.json", os.fspath(directory))
  reward_model = "score" in params
  if reward_model:
    pad = _score_pad_id(tok, pad, eos)
  eos = eos[0] if len(eos) == 1 else eos
  directory = os.fspath(directory)
  os.makedirs(directory, exist_ok=True)
  if dtype is None:
    dtype = np.dtype(layout.get(params, ("tok_embeddings",)).dtype).name
  out_dtype = layout.np_dtype(dtype)
  backbone = config.replace(tie_embeddings=True) if reward_model else config  # no lm_head to write
  produce, specs = {}, []
  for e, value in layout.export_stream(backbone, params):
    produce[e.name] = value
    specs.append((e.name, e.shape, out_dtype))
  if reward_model:
    produce["score.weight"] = lambda: np.asarray(params["score"])[None, :]
    specs.append(("score.weight", (1, config.dim), out_dtype))

  # Shards in writing order, each under the limit unless one tensor alone is larger.
  shards, size = [[]], 0
  for spec in specs:
    nbytes = out_dtype.itemsize * int(np.prod(spec[1]))
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(spec)
    size += nbytes

  # Every file is written into a staging folder first, then moved into place with config.json last
  # (and a previous export's removed first): a crash while writing leaves the previous export whole,
  # one while moving leaves no config.json (an error to every reader, never a mix of two models).
  staging = os.path.join(directory, STAGING)
  if os.path.exists(staging):
    shutil.rmtree(staging)
  os.makedirs(staging)
  weight_map, total = {}, 0
  for i, shard in enumerate(shards):
    name = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    total += safetensors_io.write_file(os.path.join(staging, name), shard, lambda n: produce[n]())
    weight_map.update({spec[0]: name for spec in shard})
  if len(shards) > 1:
    with open(os.path.join(staging, SAFETENSORS_INDEX), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)

  if tok is not None:
    tok.save(staging, for_transformers=True)
  hf_config = config_to_hf(config, out_dtype.name, bos, eos, pad)
  if reward_model:
    hf_config.update(architectures=["LlamaForSequenceClassification"], num_labels=1,
                     id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0}, tie_word_embeddings=False)
  with open(os.path.join(staging, CONFIG), "w") as f:
    json.dump(hf_config, f, indent=2)
  generation_path = os.path.join(staging, GENERATION_CONFIG)
  if reward_model:  # a classifier generates nothing (the tokenizer's save may have copied its folder's)
    if os.path.isfile(generation_path):
      os.remove(generation_path)
  else:
    generation.update(bos_token_id=bos, eos_token_id=eos)
    if pad is not None:
      generation["pad_token_id"] = pad
    with open(generation_path, "w") as f:
      json.dump(generation, f, indent=2)
  _move_into_place(staging, directory)


def _move_into_place(staging: str, directory: str) -> None:
  """The staged export's files into `directory`: its config.json out first and in last. A previous
  export's shards go (another shard count must leave none behind), and so do its tokenizer files
  that this export does not write (`checkpoint.move_staged`)."""
  if os.path.isfile(os.path.join(directory, CONFIG)):
    os.remove(os.path.join(directory, CONFIG))
  for path in glob.glob(os.path.join(directory, "model*.safetensors")) + glob.glob(
      os.path.join(directory, SAFETENSORS_INDEX)):
    os.remove(path)
  checkpoint.move_staged(directory, staging, last=CONFIG)


def _score_pad_id(tok, pad: int | None, eos_ids: list[int]) -> int:
  """A reward model's pad_token_id: not an EOS (an answer's last token, where the score is read).
  The tokenizer's pad token, else its unknown token (which byte fallback never emits), else BOS
  (only ever a sequence's first token); LLaMA's <unk> (0) without a tokenizer."""
  if pad is not None and pad not in eos_ids:
    return pad
  if tok is None:
    return 0
  for name in ("unk_token", "bos_token"):
    token = tok.special_tokens_map.get(name)
    i = tok.token_to_id(token) if token else None
    if i is not None and i not in eos_ids:
      return i
  raise CheckpointError(f"{tok.path}: the tokenizer has no pad, unknown or BOS token that is not an EOS, "
                        "for the reward model's pad_token_id")
