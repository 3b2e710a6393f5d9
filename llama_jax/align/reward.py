"""Reward models: the recipe "reward", and loading, scoring and exporting a trained one.

The model is the LLaMA backbone with a scalar head `score` on the hidden state of a sequence's last
token (the EOS that ends the answer), trained on preference pairs with the Bradley-Terry loss
-log σ(r_chosen - r_rejected) (InstructGPT, Ouyang et al. 2022, §3.5; TRL's RewardTrainer). It
starts from `init_from` (an SFT model: its output head is dropped; a reward model: its backbone,
under a fresh head) or from scratch. Metrics (means over pairs): rm/loss, rm/accuracy (the chosen
answer scored higher), rm/margin (r_c - r_r), and the same on held-out pairs under eval/.

Conversations are scored as the run rendered its pairs: in the chat template its data sources name,
read back from the run's config in its workdir (`trained_template`).

  rm = load_reward_model("runs/rm")            # a reward run's workdir (its latest step) or step dir
  rm.score([[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]])
  rm.score(["raw text is scored as BOS text EOS"])
  rm.export_hf("hf_rm")                        # transformers.LlamaForSequenceClassification
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from llama_jax import checkpoint, sharding
from llama_jax.align import recipe
from llama_jax.align.heads import last_index, reward_params, rewards
from llama_jax.align.losses import reward_loss
from llama_jax.config import ModelConfig
from llama_jax.lora.training import settings as lora_settings
from llama_jax.model import rules_in_force
from llama_jax.sharding import ConfigError
from llama_jax.tokenizer import Tokenizer, chat
from llama_jax.train import loop
from llama_jax.train import metrics as metrics_lib


class RewardRecipe(recipe.PairsRecipe):
  metric = "rm/loss"
  params_fn = staticmethod(reward_params)

  def make_training(self, config, model_cfg: ModelConfig, mesh) -> loop.Training:
    # The score is read off a row's seq_len + 1 tokens, all of them positions of the model (DPO's
    # log-probs take seq_len: the last token is only a target): one past the context would be a
    # position the model never serves, and a length `RewardModel.score_tokens` refuses.
    if config.seq_len + 1 > model_cfg.max_seq_len:
      raise ConfigError(f"seq_len {config.seq_len}: the reward model runs on rows of seq_len + 1 tokens, "
                        f"more than model.max_seq_len {model_cfg.max_seq_len}; set seq_len <= "
                        f"{model_cfg.max_seq_len - 1} (max_seq_len - 1)")
    return super().make_training(config, model_cfg, mesh)

  def load_pretrained(self, config, mesh, rules):
    # The backbone alone: an SFT model's output head is not read, and a reward model (which has
    # none, and which `load` refuses whole) is a start too.
    from llama_jax.api import load
    return load(config.init_from, mesh=mesh, rules=rules, backbone=True)

  def from_pretrained(self, loaded, config, model_cfg: ModelConfig, run):
    params = dict(loaded.params)
    params["score"] = jnp.zeros((model_cfg.dim,), model_cfg.param_dtype)
    return loop.state_from_pretrained(loaded, run, params=params)

  def objective(self, config, model_cfg: ModelConfig, params, batch: dict, frozen):
    tokens, mask, valid = recipe.pair_rows(batch)
    r = rewards(model_cfg, params, tokens, last_index(mask)).reshape(-1, 2)
    chosen, rejected = r[:, 0], r[:, 1]
    sums = {"rm/loss": reward_loss(chosen, rejected), "rm/accuracy": (chosen > rejected).astype(jnp.float32),
            "rm/margin": chosen - rejected}
    sums = {k: jnp.sum(v * valid) for k, v in sums.items()}
    return sums["rm/loss"], jnp.sum(valid), sums

  def throughput(self, config, model_cfg: ModelConfig) -> tuple[int, float]:
    """2B sequences of T + 1 tokens, forward and backward, without the output head (LoRA: the
    frozen backbone's 4 FLOPs a weight, `train.metrics.flops_per_token`)."""
    t = config.seq_len + 1
    tokens = 2 * config.batch_size * t
    frozen = lora_settings(config) is not None
    head = (4.0 if frozen else 6.0) * model_cfg.vocab_size * model_cfg.dim
    per_token = metrics_lib.flops_per_token(model_cfg, t, frozen) - head
    return tokens, per_token * tokens


@functools.partial(jax.jit, static_argnums=(0, 1))
def _scores(cfg: ModelConfig, rules, params, tokens, last):
  del rules  # in force while tracing; keys jit's cache (`model.rules_in_force`)
  return rewards(cfg, params, tokens, last)


@dataclasses.dataclass
class RewardModel:
  config: ModelConfig
  params: Any  # {tok_embeddings, layers, norm, score}
  tokenizer: Tokenizer | None = None
  mesh: Mesh | None = None
  rules: tuple = sharding.DEFAULT_RULES
  template: str | None = None  # the chat template the run trained with (`trained_template`)

  def score_tokens(self, sequences: Sequence[Sequence[int]], batch_size: int = 32) -> np.ndarray:
    """float32 (n,): the score of each token sequence, read at its last token."""
    sequences = [list(map(int, s)) for s in sequences]
    for i, s in enumerate(sequences):
      if not s:
        raise ValueError(f"sequence {i} is empty")
      if len(s) > self.config.max_seq_len:
        raise ValueError(f"sequence {i} has {len(s)} tokens, more than the model's {self.config.max_seq_len}")
      if min(s) < 0 or max(s) >= self.config.vocab_size:
        raise ValueError(f"sequence {i}: token ids must lie in [0, {self.config.vocab_size})")
    out = np.zeros(len(sequences), np.float32)
    context = sharding.activation_rules(self.mesh, self.rules) if self.mesh else contextlib.nullcontext()
    for start in range(0, len(sequences), batch_size):
      chunk = sequences[start:start + batch_size]
      # Lengths in powers of two: a handful of compilations serve every call.
      length = min(max(16, 1 << (max(map(len, chunk)) - 1).bit_length()), self.config.max_seq_len)
      tokens = np.zeros((len(chunk), length), np.int32)
      for r, s in enumerate(chunk):
        tokens[r, :len(s)] = s
      last = np.array([len(s) - 1 for s in chunk], np.int32)
      with context:
        out[start:start + len(chunk)] = np.asarray(_scores(self.config, rules_in_force(), self.params, tokens, last))
    return out

  def score(self, items: Sequence[str | Sequence[dict]], template: str = "auto") -> np.ndarray:
    """One score per item: a conversation (messages ending with the assistant's answer, rendered
    with the chat template `template`, as the model was trained; "auto": the one its run trained
    with, `self.template`, where it is known, else the tokenizer's own, else vicuna_v1.1) and read
    at the answer's last token, as training reads it; or a string (BOS, the text, EOS)."""
    if self.tokenizer is None:
      raise ValueError("this reward model has no tokenizer: score token ids with score_tokens")
    if (template or chat.AUTO) == chat.AUTO:
      template = self.template
    rendering = None
    sequences = []
    for item in items:
      if isinstance(item, str):
        sequences.append(self.tokenizer.encode(item, bos=True, eos=True))
      else:
        rendering = rendering or chat.template_for(self.tokenizer, template)
        ids, mask = rendering.encode(list(item), self.tokenizer)
        # Up to the answer's last token (its end marker), where training read the score: a template
        # may render more after it (ChatML's "\n"), a position the head never learnt from.
        answer = np.flatnonzero(np.asarray(mask))
        sequences.append(list(ids[:answer[-1] + 1]) if answer.size else list(ids))
    return self.score_tokens(sequences)

  def export_hf(self, directory: str, dtype: str | None = None, overwrite: bool = False) -> None:
    """config.json and safetensors of a transformers.LlamaForSequenceClassification (one label). A
    directory holding anything else is refused unless `overwrite` (`convert.output.check_output`)."""
    from llama_jax.convert import hf
    from llama_jax.convert.output import check_output
    check_output(os.fspath(directory), "hf", overwrite, command_line=False)
    hf.export_hf(self.config, self.params, directory,
                 tokenizer_path=self.tokenizer.path if self.tokenizer else None, dtype=dtype)


def abstract_reward_params(cfg: ModelConfig, mesh: Mesh | None = None, rules=sharding.DEFAULT_RULES):
  """ShapeDtypeStructs of a reward model's parameters, placed on `mesh` by `rules` (default: the
  first device)."""
  boxed = jax.eval_shape(lambda: reward_params(cfg, jax.random.key(0)))
  if mesh is not None:
    shardings = sharding.logical_to_sharding(nn.get_partition_spec(boxed), mesh, rules)
  else:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: device, nn.unbox(boxed))
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), nn.unbox(boxed),
                      shardings)


def trained_template(run: dict) -> str | None:
  """The chat template a reward run (its config, as a dict) rendered its pairs with: the one its
  training sources (data.sources) name, "auto" included; every preference record is rendered, so
  every source counts. None for another recipe's config, or when the sources name different
  templates: no one rendering is the model's, and `score` then needs the template named."""
  if run.get("recipe") != "reward":
    return None
  sources = run.get("data", {}).get("sources", {}).values()
  names = {str(s.get("template") or chat.AUTO) for s in sources if float(s.get("weight", 1.0)) != 0}
  return names.pop() if len(names) == 1 else None


def read_trained_template(directory: str) -> str | None:
  """`trained_template` of the run config in `directory`; None without one (a directory that
  `checkpoint.save_model` wrote alone; `convert` writes a reward model's record beside it)."""
  path = os.path.join(directory, checkpoint.RUN_CONFIG)
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      return trained_template(json.load(f))
  except json.JSONDecodeError as e:
    raise checkpoint.CheckpointError(f"{path}: not JSON ({e.msg}, line {e.lineno})") from None


def load_reward_model(path: str, mesh: Mesh | None = None, rules=None, **config_overrides) -> RewardModel:
  """A trained reward model: a reward run's workdir (its latest step), one of its step directories,
  or a directory `checkpoint.save_model` wrote. With a `mesh`, straight into its shards (by `rules`).
  A run's workdir also gives the chat template its pairs were rendered with (`trained_template`)."""
  rules = sharding.as_rules(rules or sharding.DEFAULT_RULES)
  params_dir, cfg, tokenizer_path = checkpoint.model_files(str(path))
  template = read_trained_template(checkpoint.find_params_dir(str(path))[1])
  if os.path.isfile(os.path.join(str(path), checkpoint.LORA)):
    params, cfg = lora_reward_params(str(path), mesh, rules)
  else:
    keys = checkpoint.saved_keys(params_dir)
    if keys is not None and "score" not in keys:
      raise ValueError(f"{path}: not a reward model (a backbone with a 'score' head); its parameters: "
                       f"{', '.join(keys)}")
    params = checkpoint.restore_tree(params_dir, abstract_reward_params(cfg, mesh, rules))
  if config_overrides:
    cfg = cfg.replace(**config_overrides)
  return RewardModel(cfg, params, Tokenizer(tokenizer_path) if tokenizer_path else None, mesh, rules,
                     template)


def lora_reward_params(workdir: str, mesh: Mesh | None = None, rules=sharding.DEFAULT_RULES,
                       base: str | None = None, merge: bool | None = None) -> tuple[Any, ModelConfig]:
  """A LoRA reward run (config.lora): its base's backbone (`base`, default lora.json's) with the
  adapters applied (`merge`: as `lora.files.adapt`; default merged, or attached over a quantized
  base), and the run's own score head."""
  from llama_jax.api import load
  from llama_jax.lora import files
  base_where = base or files.base_path(workdir)
  loaded = load(base_where, mesh=mesh, rules=rules, backbone=True)  # a reward model's too
  cfg, params, _ = files.adapt(workdir, loaded.config, loaded.params, base_where, merge=merge, mesh=mesh,
                               rules=rules)
  params_dir, _ = checkpoint.find_params_dir(workdir)
  head = {"score": abstract_reward_params(cfg, mesh, rules)["score"]}
  return {**params, **checkpoint.restore_tree(params_dir, head, partial=True)}, cfg
