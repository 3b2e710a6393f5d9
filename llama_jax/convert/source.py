"""Any checkpoint this project reads: which kind a path is (the one place that decides), and its
tensors as one stream of Hugging Face-named arrays.

`llama_jax.load`, the converter and the delta tools treat the three formats alike: a `Source` has a config, a
tokenizer, the dtype its weights are stored in, and `stream()`, which yields (Hugging Face name,
array, file) one tensor at a time. Our own Orbax checkpoints are restored one parameter at a time
(a stacked parameter holds every layer's tensor of its kind) and streamed from it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Iterator

import numpy as np

from llama_jax import checkpoint
from llama_jax.config import ModelConfig
from llama_jax.convert import CheckpointError, hf, layout, meta, torch_io


@dataclasses.dataclass
class Source:
  path: str
  kind: str  # "orbax", "hf", "meta", or "lora" (a LoRA run's workdir: adapters over a base model)
  config: ModelConfig
  tokenizer_path: str | None  # what `load_tokenizer` reads: the folder holding its files, or a .model
  stored_dtype: str
  stream: Callable[[], Iterator[tuple[str, np.ndarray, str]]]
  params_dir: str | None = None  # our own checkpoints: the Orbax parameter directory
  quantization: dict | None = None  # our own quantized checkpoints: quantization.json
  # The special ids and sampling defaults of a Hugging Face folder, or of our own without a
  # tokenizer (`hf.generation_defaults`): an export without a tokenizer writes them again.
  generation: dict | None = None


def open_source(path: str | os.PathLike) -> Source:
  path = os.fspath(path)
  if not os.path.exists(path):
    raise CheckpointError(f"{path}: no such file or directory")
  if checkpoint.is_own_checkpoint(path):
    params_dir, cfg, tok = checkpoint.model_files(path)
    config_dir = checkpoint.find_params_dir(path)[1]
    quantization = checkpoint.read_quantization(config_dir)
    if quantization or os.path.isfile(os.path.join(config_dir, checkpoint.LORA)):
      what = "quantized weights" if quantization else "LoRA adapters (merge them with --merge_lora first)"

      def unconvertible():
        raise CheckpointError(f"{path}: holds {what}; its tensors cannot be streamed as a float model")
        yield  # a generator, as the other streams
      kind = "orbax" if quantization else "lora"
      return Source(path, kind, cfg, tok, cfg.param_dtype, unconvertible, params_dir, quantization)

    def stream():
      for leaf_path, leaf in checkpoint.restore_host_leaves(params_dir, cfg):
        for e, tensor in layout.hf_tensors(cfg, leaf_path, leaf):
          # A copy, not a view: a view that the consumer still holds would keep the whole
          # parameter alive while the next one is restored.
          yield e.name, np.array(tensor), path
        leaf = tensor = None
    return Source(path, "orbax", cfg, tok, cfg.param_dtype, stream, params_dir,
                  generation=hf.generation_defaults(config_dir, {}))
  if os.path.isfile(os.path.join(path, checkpoint.MODEL_CONFIG)) and not os.path.isdir(
      os.path.join(path, "params")) and any(os.path.isdir(os.path.join(path, "params" + cut))
                                            for cut in (".previous", ".partial")):
    # `checkpoint.save_model` cut off in its swap: no params/ (its config.json, a reward model's
    # template record, is no Hugging Face config to read either).
    raise CheckpointError(f"{path}: a save into this folder was cut off (params.partial/ or params.previous/, "
                          "no params/): save the model there again")
  if not os.path.isfile(os.path.join(path, hf.CONFIG)) and os.path.isdir(os.path.join(path, hf.STAGING)):
    raise CheckpointError(f"{path}: a Hugging Face export into this folder was cut off ({hf.STAGING}/, no "
                          f"{hf.CONFIG}): export the model there again")
  if os.path.isfile(os.path.join(path, hf.CONFIG)):
    cfg, raw = hf.read_config(path)
    return Source(path, "hf", cfg, hf.tokenizer_in(path), hf.stored_dtype(path), lambda: hf.stream(path),
                  generation=hf.generation_defaults(path, raw))
  if os.path.isfile(os.path.join(path, meta.PARAMS)):
    shards = meta.open_meta(path)
    dtype = torch_io.to_numpy(shards.states[0]["tok_embeddings.weight"]).dtype.name  # a view, no copy
    return Source(path, "meta", shards.config, meta.tokenizer_near(path), dtype, shards.stream)
  if os.path.isfile(os.path.join(path, "adapter_config.json")):  # what `convert --to peft` writes
    raise CheckpointError(f"{path}: a Hugging Face PEFT LoRA adapter (adapter_config.json), not a model; this "
                          "project does not read PEFT adapters: use the LoRA run they were exported from (its "
                          "workdir loads as the base with the adapters), or its merge (python -m "
                          "llama_jax.convert --input RUN --merge_lora --output DIR)")
  if os.path.isfile(os.path.join(path, checkpoint.MODEL_CONFIG)):
    raise CheckpointError(f"{path}: {checkpoint.MODEL_CONFIG} but no params/ beside it: not a whole saved model "
                          "(the parameters are missing)")
  raise CheckpointError(f"{path}: not a checkpoint (no model_config.json, Hugging Face config.json "
                        "or Meta params.json)")


def load(source: Source, dtype: str | None = None) -> tuple[ModelConfig, dict]:
  """(config, writable numpy tree) in `dtype` (default: as stored)."""
  dtype = dtype or source.stored_dtype
  cfg = source.config.replace(param_dtype=dtype)
  params = layout.Assembler(cfg, source.path, dtype=layout.np_dtype(dtype)).add_all(source.stream()).finish()
  return cfg, params
