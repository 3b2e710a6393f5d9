"""An lm-evaluation-harness (EleutherAI, v0.4) model class for llama_jax checkpoints.

  llama-jax-lm-eval --model llama_jax --model_args path=CKPT,dtype=bfloat16 \
      --tasks hellaswag --include_path DIR_OF_YOUR_TASKS

lm-eval 0.4.x finds models only in its own registry (it has no plugin entry points up to 0.4.13),
so a model class outside it must be imported before its command line runs: this module registers
"llama_jax" on import, and running it as a module runs lm-eval's command line with the same
arguments. From Python, `import llama_jax.evaluate.lm_eval_harness` and pass `model="llama_jax"` (or an
instance of `LlamaJaxLM`) to `lm_eval.simple_evaluate`.

The three request types map onto `llama_jax.evaluate`: `loglikelihood` is one choice of
`evaluate.choice` (the same lm-eval-harness context/continuation split, BOS first),
`loglikelihood_rolling` scores lm-eval's own rolling windows (every token once, BOS as the first
token's context), `generate_until` runs `llama_jax.generate` and cuts at the stop strings.
"""

from __future__ import annotations

import sys
from collections import defaultdict

from lm_eval import utils as lm_utils
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

import llama_jax
from llama_jax import errors
from llama_jax.evaluate import choice, scoring
from llama_jax.evaluate.scoring import Request


@register_model("llama_jax")
class LlamaJaxLM(LM):
  """model_args: path (any checkpoint llama_jax.load reads), dtype, tokenizer, batch_size,
  max_length (default and at most: the model's max_seq_len), max_gen_toks (default 256).

  As lm-eval's HF model does, a loglikelihood request longer than max_length + 1 tokens keeps its
  last max_length + 1 (the context loses its beginning); one whose continuation alone does not
  fit is an error."""

  def __init__(self, path: str | None = None, model: llama_jax.Model | None = None,
               dtype: str | None = None, tokenizer: str | None = None, batch_size=8,
               max_length: int | None = None, max_gen_toks: int = 256, seed: int = 0, **_unused):
    # lm-eval also passes device, max_batch_size and the like; JAX places arrays itself.
    super().__init__()
    if model is None:
      if path is None:
        raise ValueError("llama_jax needs model_args path=CHECKPOINT")
      model = llama_jax.load(path, dtype=dtype, tokenizer=tokenizer)
    if model.tokenizer is None:
      raise ValueError("the checkpoint has no tokenizer (tokenizer.json or tokenizer.model); pass "
                       "model_args tokenizer=PATH")
    self.model = model
    self.tok = model.tokenizer
    # The first token's context: BOS, or EOS for a tokenizer with none (lm-eval's HFLM does the same).
    self._prefix_token = self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id
    # "auto" (lm-eval's batch-size search) is not supported: a fixed size keeps compilations few.
    self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
    context = model.config.max_seq_len
    self.max_length = context if max_length is None else int(max_length)
    if not 1 <= self.max_length <= context:  # beyond it: positions the model never trained on
      raise ValueError(f"model_args max_length must lie in [1, {context}] (the model's context, its "
                       f"max_seq_len), got {self.max_length}")
    self.max_gen_toks = int(max_gen_toks)
    self.seed = int(seed)

  def _score(self, requests: list[Request], desc: str, disable_tqdm: bool) -> list[scoring.Score]:
    return scoring.score(self.model.config, self.model.params, requests, self.batch_size,
                         self.max_length, self.tok.pad_id, desc, progress=not disable_tqdm)

  def _request(self, context: str, continuation: str) -> Request:
    if context == "":
      # Nothing to condition the first token on but the prefix token (lm-eval's HFLM does the same;
      # a tokenizer without BOS would otherwise leave the continuation's first token unscorable).
      return Request([self._prefix_token, *self.tok.encode(continuation, bos=False)], 1)
    return choice.request(self.tok, context, continuation)

  def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
    # An empty continuation is certain: log 1 = 0, and greedy (lm-eval's HFLM fails on it).
    pairs = [r.args for r in requests]
    scored = [i for i, (_, continuation) in enumerate(pairs) if continuation]
    scores = self._score([self._request(*pairs[i]) for i in scored], "loglikelihood", disable_tqdm)
    out = [(0.0, True)] * len(pairs)
    for i, s in zip(scored, scores):
      out[i] = (s.logprob, s.greedy)
    return out

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    reqs, owners = [], []
    for i, (text,) in enumerate(r.args for r in requests):
      # lm-eval's windows: max_length predictions each, the last one with a full context.
      windows = lm_utils.get_rolling_token_windows(
          token_list=self.tok.encode(text, bos=False), prefix_token=self._prefix_token,
          max_seq_len=self.max_length, context_len=1)
      for context, predicted in map(lm_utils.make_disjoint_window, windows):
        reqs.append(Request(list(context) + list(predicted), len(context)))
        owners.append(i)
    totals = [0.0] * len(requests)
    for i, s in zip(owners, self._score(reqs, "loglikelihood_rolling", disable_tqdm)):
      totals[i] += s.logprob
    return totals

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    # One sampler call per distinct set of generation arguments (usually one per task).
    groups = defaultdict(list)
    for i, (context, gen_kwargs) in enumerate(r.args for r in requests):
      groups[repr(sorted(gen_kwargs.items()))].append((i, context, gen_kwargs))
    out: list[str] = [""] * len(requests)
    for items in groups.values():
      kwargs = dict(items[0][2])
      until = kwargs.pop("until", None) or []
      until = [until] if isinstance(until, str) else list(until)
      # lm-eval's names for the token budget (its normalize_gen_kwargs), the first given.
      budget = [kwargs.pop(k) for k in ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")
                if kwargs.get(k) is not None]
      max_new = int(budget[0]) if budget else self.max_gen_toks
      if max_new >= self.max_length:
        raise ValueError(f"generate_until asks for {max_new} new tokens, but the model's context (max_length) "
                         f"is {self.max_length}: no room for a prompt (set max_gen_toks lower)")
      temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
      # As lm-eval 0.4's normalize_gen_kwargs: a temperature above 0 samples unless do_sample=False.
      if kwargs.pop("do_sample", temperature > 0) is False:
        temperature = 0.0
      # Keep the end of a long context: room for max_new tokens inside the model's length.
      keep = self.max_length - max_new
      prompts = [self.tok.encode(context, bos=True)[-keep:] for _, context, _ in items]
      full = self.model.generate(prompts, max_new_tokens=max_new, temperature=temperature,
                                 top_p=float(kwargs.pop("top_p", 1.0) or 1.0),
                                 top_k=int(kwargs.pop("top_k", 0) or 0), seed=self.seed)
      for (i, _, _), prompt, ids in zip(items, prompts, full):
        new = [t for t in ids[len(prompt):] if t != self.tok.eos_id]
        text = self.tok.decode_continuation(prompt, new)
        for stop in until:
          if stop and stop in text:
            text = text[:text.index(stop)]
        out[i] = text
    return out


def main() -> None:
  """lm-eval's command line, with "llama_jax" registered. A bad checkpoint path or model_args is
  one line and exit code 1, as in our other commands."""
  from lm_eval.__main__ import cli_evaluate
  sys.argv[0] = "lm_eval"
  errors.run_cli(cli_evaluate)


if __name__ == "__main__":
  main()
