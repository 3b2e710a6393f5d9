"""The LLaMA transformer in Flax Linen.

Follows Meta's reference `llama/model.py` (Touvron et al. 2023): pre-norm blocks with RMSNorm,
rotary position embeddings, grouped-query attention and a SwiGLU feed-forward. Parameter names are
Meta's, so checkpoint conversion is renames and transposes. Rotary embeddings rotate the two halves
of each head (the Hugging Face layout); Meta checkpoints are permuted on conversion (`convert`).

At the `jit` boundary the model is a pure function:
  logits = Transformer(cfg).apply({'params': p}, tokens, positions, segment_ids=...)

Decoding reuses the pieces (`embed`, `Block`, `norm_head`) with a key/value cache: `Attention` takes
an optional cache object of one layer and returns it updated; what the cache holds and how it is
written is `llama_jax.generate.cache`'s business, not the model's. With a cache and no mask the call
is a prefill from position 0 (causal over its own keys); with a mask it attends over the cache.

Dimension letters: B batch, T query length, S key length, D model dim, N query heads,
K key/value heads, G query heads per K/V head, H head dim, F feed-forward dim, V vocabulary, L layers.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from llama_jax import projection
from llama_jax.config import ModelConfig
from llama_jax.kernels import decode_attention, matvec

Array = jax.Array
Rope = tuple[Array, Array]  # (sin, cos), each (B, T, 1, H/2) float32

# Logical axis names of parameters and activations; `sharding.DEFAULT_RULES` maps them to mesh axes.
EMBED, HEADS, KV_HEADS, HEAD_DIM, MLP, VOCAB, LAYERS = (
    "embed", "heads", "kv_heads", "head_dim", "mlp", "vocab", "layers")
BATCH, LENGTH, ACT_EMBED = "batch", "length", "act_embed"


def _dots_and_attention(prim, *args, **params) -> bool:
  """dots_no_batch, and the outputs of cuDNN's attention forward (its output and softmax
  statistics: the residuals its backward reads), so that the backward pass does not run the
  attention forward again. A sequence's keys are attended once per layer where dots_no_batch runs
  that kernel twice; the saved output is (B, T, N, H) a layer. XLA's attention is batched dots,
  which this policy recomputes as dots_no_batch does."""
  return (prim.name.startswith("dot_product_attention_fwd")
          or jax.checkpoint_policies.dots_with_no_batch_dims_saveable(prim, *args, **params))


# Remat policies by name: what each block saves for the backward pass instead of recomputing.
REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_and_attention": _dots_and_attention,
    # The projections' outputs (tagged with checkpoint_name below): attention is recomputed.
    "save_matmuls": jax.checkpoint_policies.save_only_these_names(
        "q_proj", "k_proj", "v_proj", "attn_out", "ffn_gate", "ffn_up", "ffn_out"),
}

_init = nn.initializers.normal(stddev=0.02)

# Every projection of a block: the module holding it and how many leading axes of its weight are
# inputs (the rest are outputs). Quantization groups and LoRA adapters split a weight there.
PROJECTIONS = {"wq": ("attention", 1), "wk": ("attention", 1), "wv": ("attention", 1),
               "wo": ("attention", 2), "w1": ("feed_forward", 1), "w3": ("feed_forward", 1),
               "w2": ("feed_forward", 1)}
# Projections that read the same input (GPTQ gathers one Hessian for each such group).
SHARED_INPUTS = (("wq", "wk", "wv"), ("wo",), ("w1", "w3"), ("w2",))
# The model's own top-level parameters; a recipe's tree may hold heads beside them (llama_jax.align).
MODEL_KEYS = ("tok_embeddings", "layers", "norm", "output")


class LayerCache(Protocol):
  """What `Attention` needs of one layer's key/value cache (`generate.cache.KVCache` is one)."""
  layout: str  # the einsum letters of the keys and values it returns, e.g. "BKSH"
  # A prefill's writer (`generate.cache.RowWriter`): nothing is read back, this call's own keys
  # are all its queries attend over (under the mask, if any: prompts packed into one row).
  write_only: bool

  def write(self, k: Array, v: Array, positions: Array) -> "LayerCache":
    """The cache with k, v (B, T, K, H) written at positions (B, T)."""

  def read(self, dtype) -> tuple[Array, Array]:
    """All keys and values, in `layout`, in `dtype`."""


def _param(module: nn.Module, name: str, shape, axes, init=_init):
  dtype = jnp.dtype(module.cfg.param_dtype)
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def _weight(module: nn.Module, name: str, shape, axes):
  """The parameter `name`: a plain array, or a structured weight (quantized, or with LoRA adapters:
  `llama_jax.projection`) as the caller's parameter tree holds it."""
  if module.has_variable("params", name):
    stored = module.get_variable("params", name)
    if projection.is_structured(stored):
      return stored
  return _param(module, name, shape, axes)


def _project(module: nn.Module, name: str, equation: str, x: Array, shape, axes) -> Array:
  """One projection: the weight `name` (logical `shape`) contracted with x as `equation` says, in
  the compute dtype (`projection.project`: a plain weight stored in param_dtype and cast, as one
  2-D matmul; or a structured one, quantized or with LoRA adapters). Every matmul weight of a block
  goes through here. Applied with `mutable=["projection_inputs"]`, the inputs are recorded (GPTQ's
  calibration reads them); otherwise `sow` does nothing."""
  module.sow("projection_inputs", name, x)
  w = _weight(module, name, shape, axes)
  return projection.project(equation, x, w, module.cfg.dtype)


def _constrain(x: Array, axes) -> Array:
  return nn.with_logical_constraint(x, axes)


class RMSNorm(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    weight = _param(self, "weight", (self.cfg.dim,), (EMBED,), nn.initializers.ones)
    return matvec.rms_norm(x, weight, self.cfg.norm_eps)  # the decode kernels' XLA path shares it


def rotary_frequencies(cfg: ModelConfig) -> Array:
  """(H/2,) float32 angular frequencies theta^(-2i/H), rescaled as cfg.rope_scaling says (float32
  arithmetic, as transformers' `ROPE_INIT_FUNCTIONS` and Meta's `apply_scaling` compute them)."""
  h = cfg.head_dim
  freqs = 1.0 / (cfg.rope_theta ** (jnp.arange(0, h // 2, dtype=jnp.float32) * 2 / h))
  if cfg.rope_scaling == "linear":
    return freqs / cfg.rope_scaling_factor
  if cfg.rope_scaling == "llama3":
    low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    original, factor = cfg.rope_original_max_seq_len, cfg.rope_scaling_factor
    wavelength = 2 * math.pi / freqs
    # Between the two wavelengths, a blend of the scaled and the original frequency.
    smooth = (original / wavelength - low) / (high - low)
    blended = (1 - smooth) * freqs / factor + smooth * freqs
    scaled = jnp.where(wavelength > original / low, freqs / factor, freqs)
    medium = (wavelength >= original / high) & (wavelength <= original / low)
    return jnp.where(medium, blended, scaled)
  return freqs


def rotary_tables(positions: Array, cfg: ModelConfig) -> Rope:
  """sin and cos of angle position * frequency (`rotary_frequencies`): (B, T, 1, H/2) each, made
  once per forward pass and shared by every layer's queries and keys."""
  angles = positions.astype(jnp.float32)[..., None, None] * rotary_frequencies(cfg)  # (B, T, 1, H/2)
  return jnp.sin(angles), jnp.cos(angles)


def rotary(x: Array, rope: Rope) -> Array:
  """Rotates each head's two halves (x1, x2) by the tables' angles. x: (B, T, heads, H)."""
  sin, cos = rope
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def attention_mask(q_positions: Array, kv_positions: Array, q_segments: Array | None = None,
                   kv_segments: Array | None = None) -> Array:
  """(B, T, S) bool: a query sees keys at its own position or before, in its own segment."""
  mask = kv_positions[:, None, :] <= q_positions[:, :, None]
  if q_segments is not None:
    mask &= q_segments[:, :, None] == kv_segments[:, None, :]
  return mask


def xla_attention(q: Array, k: Array, v: Array, mask: Array, kv_layout: str = "BSKH") -> Array:
  """Grouped-query attention in plain XLA. q (B, T, N, H), k/v (B, S, K, H) or, with
  kv_layout="BKSH", (B, K, S, H) (the cache's layout); mask (B, T, S)."""
  b, t, n, h = q.shape
  kv_heads = k.shape[kv_layout.index("K")]
  q = q.reshape(b, t, kv_heads, n // kv_heads, h)  # (B, T, K, G, H): query heads share a K/V head
  scores = jnp.einsum(f"BTKGH,{kv_layout}->BKGTS", q, k, preferred_element_type=jnp.float32)
  scores = scores * (h ** -0.5)
  scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum(f"BKGTS,{kv_layout}->BTKGH", probs, v)
  return out.reshape(b, t, n, h)


def cudnn_attention(q: Array, k: Array, v: Array, mask: Array | None) -> Array:
  """cuDNN flash attention (NVIDIA GPUs, bfloat16/float16). mask None: plain causal."""
  if mask is None:
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
  return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation="cudnn")


class Attention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: Array, positions: Array, rope: Rope, mask: Array | None,
               cache: LayerCache | None = None) -> tuple[Array, LayerCache | None]:
    cfg = self.cfg
    d, n, kv, h = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    if self.has_variable("params", "wqkv_t"):
      # The engine's decode layout (`generate.engine.fuse_layer`): wq, wk, wv stacked, output-major
      # (plain or quantized), one matmul instead of three, which a one-token decode step is
      # launch-bound on.
      qkv = _project(self, "wqkv_t", "BTD,CD->BTC", x, ((n + 2 * kv) * h, d), (HEADS, EMBED))
      q, k, v = jnp.split(qkv.reshape(*x.shape[:2], n + 2 * kv, h), [n, n + kv], axis=2)
    else:
      q = checkpoint_name(_project(self, "wq", "BTD,DNH->BTNH", x, (d, n, h), (EMBED, HEADS, HEAD_DIM)),
                          "q_proj")  # (B, T, N, H)
      k = checkpoint_name(_project(self, "wk", "BTD,DKH->BTKH", x, (d, kv, h), (EMBED, KV_HEADS, HEAD_DIM)),
                          "k_proj")  # (B, T, K, H)
      v = checkpoint_name(_project(self, "wv", "BTD,DKH->BTKH", x, (d, kv, h), (EMBED, KV_HEADS, HEAD_DIM)),
                          "v_proj")  # (B, T, K, H)
    q, k = rotary(q, rope), rotary(k, rope)

    kv_layout = "BSKH"
    if cache is not None:
      cache = cache.write(k, v, positions)
      if mask is not None and not cache.write_only:
        # Decoding: attend over everything cached so far, this call's keys included.
        k, v = cache.read(cfg.dtype)
        kv_layout = cache.layout
      # Otherwise a prefill from position 0: this call's own keys are all there is to see (causal,
      # or the mask of prompts packed side by side), and the fused kernel can run on them.

    if mask is None:  # plain causal over a sequence that starts at position 0
      if cfg.attention_impl == "cudnn":
        out = cudnn_attention(q, k, v, None)
      else:
        idx = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
        out = xla_attention(q, k, v, attention_mask(idx, idx))
    elif cfg.attention_impl == "cudnn" and kv_layout == "BSKH":  # packed documents or prompts
      out = cudnn_attention(q, k, v, mask)
    elif (cfg.decode_attention == "pallas" and kv_layout == "BKSH" and x.shape[1] == 1
          and decode_attention.supported(k.shape[2])):
      # A decode step: each row reads its own filled positions, 0..position (the mask's row).
      lengths = jnp.minimum(positions[:, 0] + 1, k.shape[2])
      out = decode_attention.ragged_decode_attention(q, k, v, lengths)
    else:  # and every masked attention over the cache (one query per row, per-row positions)
      out = xla_attention(q, k, v, mask, kv_layout)
    if self.has_variable("params", "wo_t"):
      # The engine's layout: wo transposed, (D, N*H), so that a one-token step's contraction runs
      # over the weight's minor axis (XLA turns a matrix-vector product into a multiply and a
      # reduction; over the major axis that reduction first writes the weight-sized product).
      out = _project(self, "wo_t", "BTF,DF->BTD", out.reshape(*out.shape[:2], n * h), (d, n * h),
                     (EMBED, HEADS))
    else:
      out = _project(self, "wo", "BTNH,NHD->BTD", out, (n, h, d), (HEADS, HEAD_DIM, EMBED))
    return checkpoint_name(out, "attn_out"), cache


class FeedForward(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d, f = self.cfg.dim, self.cfg.hidden_dim
    # The engine's decode layout (`generate.engine.fuse_layer`): w1 over w3 and w2, output-major
    # (`w13_t`, `w2_t`; plain or quantized).
    if self.has_variable("params", "w13_t"):
      gate, up = jnp.split(_project(self, "w13_t", "BTD,FD->BTF", x, (2 * f, d), (MLP, EMBED)), 2, axis=-1)
    else:
      gate = checkpoint_name(_project(self, "w1", "BTD,DF->BTF", x, (d, f), (EMBED, MLP)), "ffn_gate")
      up = checkpoint_name(_project(self, "w3", "BTD,DF->BTF", x, (d, f), (EMBED, MLP)), "ffn_up")
    hidden = jax.nn.silu(gate) * up
    if self.has_variable("params", "w2_t"):
      out = _project(self, "w2_t", "BTF,DF->BTD", hidden, (d, f), (EMBED, MLP))
    else:
      out = _project(self, "w2", "BTF,FD->BTD", hidden, (f, d), (MLP, EMBED))
    return checkpoint_name(out, "ffn_out")


class Block(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: Array, positions: Array, rope: Rope, mask: Array | None,
               cache: LayerCache | None = None) -> tuple[Array, LayerCache | None]:
    h, cache = Attention(self.cfg, name="attention")(
        RMSNorm(self.cfg, name="attention_norm")(x), positions, rope, mask, cache)
    x = _constrain(x + h, (BATCH, LENGTH, ACT_EMBED))
    x = x + FeedForward(self.cfg, name="feed_forward")(RMSNorm(self.cfg, name="ffn_norm")(x))
    return _constrain(x, (BATCH, LENGTH, ACT_EMBED)), cache


class _ScannedBlock(nn.Module):
  """A Block in the (carry, xs) -> (carry, ys) form that nn.scan wants; the carry is the hidden
  state, the rest is the same for every layer."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, positions, rope, mask):
    block = Block
    if self.cfg.remat_policy != "none":
      block = nn.remat(Block, policy=REMAT[self.cfg.remat_policy], prevent_cse=False)
    x, _ = block(self.cfg, name="block")(x, positions, rope, mask)
    return x, None


@jax.custom_vjp
def output_logits(x: Array, w: Array) -> Array:
  """x (B, T, D) @ w (D, V) -> float32 logits, accumulated and returned in float32 (the loss's
  softmax wants them exact), while the backward pass runs in x's dtype: the float32 cotangent of
  the logits would otherwise turn the head's two gradient matmuls, the largest of the model, into
  float32 (TF32) ones (measured on an H200, TinyLlama batch 8 x 2048: 17 ms of a 231 ms step)."""
  return jnp.einsum("BTD,DV->BTV", x, w, preferred_element_type=jnp.float32)


def _output_logits_fwd(x, w):
  return output_logits(x, w), (x, w)


def _output_logits_bwd(residuals, g):
  x, w = residuals
  g = g.astype(x.dtype)  # (B, T, V)
  return jnp.einsum("BTV,DV->BTD", g, w), jnp.einsum("BTD,BTV->DV", x, g).astype(w.dtype)


output_logits.defvjp(_output_logits_fwd, _output_logits_bwd)


class Transformer(nn.Module):
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    self.tok_embeddings = self.param(
        "tok_embeddings", nn.with_logical_partitioning(_init, (VOCAB, EMBED)),
        (cfg.vocab_size, cfg.dim), jnp.dtype(cfg.param_dtype))
    # All blocks' parameters are stacked on a leading "layers" axis whether or not the forward pass
    # scans, so that checkpoints have one layout; scan_layers=False unrolls the loop instead.
    self.layers = nn.scan(
        _ScannedBlock,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
        length=cfg.n_layers,
        unroll=1 if cfg.scan_layers else cfg.n_layers,
        metadata_params={nn.PARTITION_NAME: LAYERS},
    )(cfg)
    self.norm = RMSNorm(cfg)
    if not cfg.tie_embeddings:  # may be quantized (`python -m llama_jax.quantize --quantize_output`)
      self.output = _weight(self, "output", (cfg.dim, cfg.vocab_size), (EMBED, VOCAB))

  def embed(self, tokens: Array) -> Array:
    """(B, T) int -> (B, T, D) in the compute dtype."""
    x = jnp.take(self.tok_embeddings, tokens, axis=0).astype(self.cfg.dtype)
    return _constrain(x, (BATCH, LENGTH, ACT_EMBED))

  def hidden(self, tokens: Array, positions: Array, segment_ids: Array | None = None) -> Array:
    """The final normed hidden states (B, T, D), before the output head."""
    if segment_ids is not None:
      idx = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
      mask = attention_mask(idx, idx, segment_ids, segment_ids)
    else:
      mask = None  # causal: each attention implementation builds it its own way
    rope = rotary_tables(positions, self.cfg)
    x, _ = self.layers(self.embed(tokens), positions, rope, mask)
    return self.norm(x)

  def head(self, x: Array) -> Array:
    """Logits in float32: (B, T, D) -> (B, T, V)."""
    w = self.tok_embeddings.T if self.cfg.tie_embeddings else self.output
    if projection.is_structured(w):  # a quantized head: dequantized inside its matmul
      return projection.project("BTD,DV->BTV", x, w, x.dtype, out_dtype=jnp.float32)
    return output_logits(x, w.astype(x.dtype))

  def norm_head(self, x: Array) -> Array:
    """The final RMSNorm and the output head: (B, T, D) last block output -> float32 logits."""
    return self.head(self.norm(x))

  def __call__(self, tokens: Array, positions: Array | None = None,
               segment_ids: Array | None = None) -> Array:
    """tokens (B, T) int; positions (B, T), default 0..T-1; segment_ids (B, T) keeps attention
    inside packed documents. Returns float32 logits (B, T, V)."""
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return self.head(self.hidden(tokens, positions, segment_ids))


def init_params(cfg: ModelConfig, rng: Array) -> Any:
  """Boxed (logically partitioned) parameters; `nn.unbox` them for plain arrays."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  return Transformer(cfg).init(rng, tokens)["params"]


@functools.lru_cache(maxsize=32)
def param_shapes(cfg: ModelConfig) -> Any:
  """The parameter tree as boxed ShapeDtypeStructs (shapes, dtypes and logical axis names), made
  without any arrays: the one source of restore targets and shardings."""
  return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))


def rules_in_force() -> tuple:
  """The logical-axis rules in force (`sharding.activation_rules`), which the model's
  `with_logical_constraint` calls read while tracing, as nested tuples. A jitted function whose
  trace runs the model takes them as a static argument: jit's cache keys on the mesh in force but
  not on flax's rules, and would otherwise reuse a trace made under other rules."""
  return tuple((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes)
               for name, axes in nn.get_logical_axis_rules())


@functools.partial(jax.jit, static_argnums=(0, 1))
def _forward(cfg: ModelConfig, rules, params, tokens, positions):
  del rules  # in force in flax's context while tracing; an argument only to key jit's cache
  return Transformer(cfg).apply({"params": params}, tokens, positions)


def forward(cfg: ModelConfig, params, tokens: Array, positions: Array | None = None) -> Array:
  """Jitted full forward pass: float32 logits (B, T, V)."""
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  return _forward(cfg, rules_in_force(), params, tokens, positions)
