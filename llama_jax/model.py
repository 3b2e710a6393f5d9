"""The LLaMA transformer in Flax Linen.

Follows Meta's reference `llama/model.py` (Touvron et al. 2023): pre-norm blocks with RMSNorm,
rotary position embeddings, grouped-query attention and a SwiGLU feed-forward. Parameter names are
Meta's, so checkpoint conversion is renames and transposes. Rotary embeddings rotate the two halves
of each head (the Hugging Face layout); Meta checkpoints are permuted on conversion (`interop`).

At the `jit` boundary the model is a pure function:
  logits, cache = Transformer(cfg).apply({'params': p}, tokens, positions, segment_ids=..., cache=...)

Dimension letters: B batch, T query length, S key length, D model dim, N query heads,
K key/value heads, G query heads per K/V head, H head dim, F feed-forward dim, V vocabulary, L layers.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from llama_jax.config import ModelConfig

Array = jax.Array

# Logical axis names of parameters and activations; `sharding.LOGICAL_RULES` maps them to mesh axes.
EMBED, HEADS, KV_HEADS, HEAD_DIM, MLP, VOCAB, LAYERS = (
    "embed", "heads", "kv_heads", "head_dim", "mlp", "vocab", "layers")
BATCH, LENGTH, ACT_EMBED = "batch", "length", "act_embed"

# Remat policies by name: what each block saves for the backward pass instead of recomputing.
REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # The projections' outputs (tagged with checkpoint_name below): attention is recomputed.
    "save_matmuls": jax.checkpoint_policies.save_only_these_names(
        "q_proj", "k_proj", "v_proj", "attn_out", "ffn_gate", "ffn_up", "ffn_out"),
}

_init = nn.initializers.normal(stddev=0.02)


class KVCache(NamedTuple):
  """Keys and values of every layer, written at each row's positions: stacked arrays
  (L, B, K, S, H) for the scanned layers, or tuples of L arrays (B, K, S, H), one buffer per layer,
  for the unrolled ones (`hidden(layers=...)`), which then neither slice nor restack it. (B, K, S, H)
  is the layout attention's batched matmuls (batch B, K) read, so no step transposes it."""
  k: Array | tuple[Array, ...]
  v: Array | tuple[Array, ...]

  @property
  def length(self) -> int:
    return jax.tree.leaves(self.k)[0].shape[-2]


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int, dtype=None,
               per_layer: bool = False) -> KVCache:
  dtype = dtype or cfg.dtype
  shape = (batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
  if per_layer:
    return KVCache(*(tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers)) for _ in "kv"))
  return KVCache(*(jnp.zeros((cfg.n_layers,) + shape, dtype) for _ in "kv"))


def _param(module: nn.Module, name: str, shape, axes, init=_init):
  dtype = jnp.dtype(module.cfg.param_dtype)
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def _constrain(x: Array, axes) -> Array:
  return nn.with_logical_constraint(x, axes)


class RMSNorm(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    weight = _param(self, "weight", (self.cfg.dim,), (EMBED,), nn.initializers.ones)
    x32 = x.astype(jnp.float32)  # the statistics in float32, as Meta's `_norm(x.float())`
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.cfg.norm_eps)
    return (normed.astype(x.dtype) * weight.astype(x.dtype))


def rotary(x: Array, positions: Array, theta: float) -> Array:
  """Rotates each head's two halves by angle position * theta^(-2i/H). x: (B, T, ..., H)."""
  half = x.shape[-1] // 2
  freqs = 1.0 / (theta ** (jnp.arange(0, half, dtype=jnp.float32) * 2 / x.shape[-1]))
  angles = positions.astype(jnp.float32)[..., None] * freqs  # (B, T, H/2)
  angles = angles.reshape(angles.shape[:2] + (1,) * (x.ndim - 3) + (half,))
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


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
  def __call__(self, x: Array, positions: Array, mask: Array | None, cache: KVCache | None,
               layer: Array | None) -> tuple[Array, KVCache | None]:
    """cache: the stacked cache of all layers, this one's at index `layer`, or (layer None) this
    layer's own (B, K, S, H) buffers."""
    cfg = self.cfg
    dt = jnp.dtype(cfg.dtype)
    d, n, k_heads, h = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    wq = _param(self, "wq", (d, n, h), (EMBED, HEADS, HEAD_DIM)).astype(dt)
    wk = _param(self, "wk", (d, k_heads, h), (EMBED, KV_HEADS, HEAD_DIM)).astype(dt)
    wv = _param(self, "wv", (d, k_heads, h), (EMBED, KV_HEADS, HEAD_DIM)).astype(dt)
    wo = _param(self, "wo", (n, h, d), (HEADS, HEAD_DIM, EMBED)).astype(dt)

    q = checkpoint_name(jnp.einsum("BTD,DNH->BTNH", x, wq), "q_proj")  # (B, T, N, H)
    k = checkpoint_name(jnp.einsum("BTD,DKH->BTKH", x, wk), "k_proj")  # (B, T, K, H)
    v = checkpoint_name(jnp.einsum("BTD,DKH->BTKH", x, wv), "v_proj")  # (B, T, K, H)
    q = rotary(q, positions, cfg.rope_theta)
    k = rotary(k, positions, cfg.rope_theta)

    if cache is not None:
      # Write this call's keys into this layer's slots at each row's own positions (rows of one
      # batch may be at different lengths), then attend over the layer's whole cache; the mask
      # hides slots after the query. The write is a scatter into the carried buffer, in place:
      # per-layer caches sliced out and stacked back would copy the whole cache every step.
      rows = jnp.arange(x.shape[0])[:, None]  # (B, 1)
      # Indexed (rows, :, positions): numpy puts the indexed (B, T) first, so the slots written
      # are (B, T, K, H), the shape of k and v.
      where = (rows, slice(None), positions) if layer is None else (layer, rows, slice(None), positions)
      cache = KVCache(*(buf.at[where].set(new.astype(buf.dtype))
                        for buf, new in ((cache.k, k), (cache.v, v))))
      k, v = (cache.k, cache.v) if layer is None else (cache.k[layer], cache.v[layer])
      k, v = k.astype(dt), v.astype(dt)  # (B, K, S, H)
      kv_layout = "BKSH"
    else:
      kv_layout = "BSKH"

    if cfg.attention_impl == "cudnn":
      if kv_layout == "BKSH":
        k, v = k.swapaxes(1, 2), v.swapaxes(1, 2)
      out = cudnn_attention(q, k, v, mask)
    else:
      if mask is None:  # plain causal over a sequence that starts at position 0
        idx = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
        mask = attention_mask(idx, idx)
      out = xla_attention(q, k, v, mask, kv_layout)
    out = checkpoint_name(jnp.einsum("BTNH,NHD->BTD", out, wo), "attn_out")
    return out, cache


class FeedForward(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.cfg
    dt = jnp.dtype(cfg.dtype)
    w1 = _param(self, "w1", (cfg.dim, cfg.hidden_dim), (EMBED, MLP)).astype(dt)
    w3 = _param(self, "w3", (cfg.dim, cfg.hidden_dim), (EMBED, MLP)).astype(dt)
    w2 = _param(self, "w2", (cfg.hidden_dim, cfg.dim), (MLP, EMBED)).astype(dt)
    gate = checkpoint_name(jnp.einsum("BTD,DF->BTF", x, w1), "ffn_gate")  # (B, T, F)
    up = checkpoint_name(jnp.einsum("BTD,DF->BTF", x, w3), "ffn_up")  # (B, T, F)
    return checkpoint_name(jnp.einsum("BTF,FD->BTD", jax.nn.silu(gate) * up, w2), "ffn_out")


class Block(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, positions, mask, cache, layer):
    h, cache = Attention(self.cfg, name="attention")(
        RMSNorm(self.cfg, name="attention_norm")(x), positions, mask, cache, layer)
    x = _constrain(x + h, (BATCH, LENGTH, ACT_EMBED))
    x = x + FeedForward(self.cfg, name="feed_forward")(RMSNorm(self.cfg, name="ffn_norm")(x))
    return _constrain(x, (BATCH, LENGTH, ACT_EMBED)), cache


class _ScannedBlock(nn.Module):
  """A Block in the (carry, xs) -> (carry, ys) form that nn.scan wants: the carry is the hidden
  state and the cache of all layers, xs the layer index."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, carry, layer, positions, mask):
    block = Block
    if self.cfg.remat_policy != "none":
      block = nn.remat(Block, policy=REMAT[self.cfg.remat_policy], prevent_cse=False)
    x, cache = carry
    return block(self.cfg, name="block")(x, positions, mask, cache, layer), None


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
        in_axes=(0, nn.broadcast, nn.broadcast),
        length=cfg.n_layers,
        unroll=1 if cfg.scan_layers else cfg.n_layers,
        metadata_params={nn.PARTITION_NAME: LAYERS},
    )(cfg)
    self.norm = RMSNorm(cfg)
    if not cfg.tie_embeddings:
      self.output = self.param(
          "output", nn.with_logical_partitioning(_init, (EMBED, VOCAB)),
          (cfg.dim, cfg.vocab_size), jnp.dtype(cfg.param_dtype))

  def hidden(self, tokens: Array, positions: Array, segment_ids: Array | None = None,
             cache: KVCache | None = None, layers: Any = None) -> tuple[Array, KVCache | None]:
    """The final normed hidden states (B, T, D), before the output head. `layers`: the blocks'
    parameters as one tree per layer (`unstack_layers`), run by an unrolled loop in place of the
    stacked ones (then the applied params need no "layers" entry), with a per-layer cache."""
    cfg = self.cfg
    x = jnp.take(self.tok_embeddings, tokens, axis=0).astype(cfg.dtype)  # (B, T, D)
    x = _constrain(x, (BATCH, LENGTH, ACT_EMBED))
    if cache is not None:
      slots = jnp.broadcast_to(jnp.arange(cache.length), (tokens.shape[0], cache.length))
      mask = attention_mask(positions, slots)
    elif segment_ids is not None:
      idx = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
      mask = attention_mask(idx, idx, segment_ids, segment_ids)
    else:
      mask = None  # causal: each attention implementation builds it its own way
    if layers is None:
      (x, cache), _ = self.layers((x, cache), jnp.arange(cfg.n_layers), positions, mask)
    else:
      new_caches = []
      for i, layer_params in enumerate(layers):
        own = None if cache is None else KVCache(cache.k[i], cache.v[i])
        # parent=None: a module of its own, applied to its own parameters, not a submodule
        x, own = Block(cfg, parent=None).apply({"params": layer_params}, x, positions, mask, own, None)
        new_caches.append(own)
      if cache is not None:
        cache = KVCache(tuple(c.k for c in new_caches), tuple(c.v for c in new_caches))
    return self.norm(x), cache

  def head(self, x: Array) -> Array:
    """Logits in float32: (B, T, D) -> (B, T, V)."""
    w = self.tok_embeddings.T if self.cfg.tie_embeddings else self.output
    return jnp.einsum("BTD,DV->BTV", x, w.astype(x.dtype), preferred_element_type=jnp.float32)

  def __call__(self, tokens: Array, positions: Array | None = None, segment_ids: Array | None = None,
               cache: KVCache | None = None, layers: Any = None) -> tuple[Array, KVCache | None]:
    """tokens (B, T) int; positions (B, T), default 0..T-1; segment_ids (B, T) keeps attention
    inside packed documents; with a cache, keys are written at `positions` and all earlier
    positions of the cache are attended to. Returns float32 logits (B, T, V) and the new cache."""
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    x, cache = self.hidden(tokens, positions, segment_ids, cache, layers)
    return self.head(x), cache


def unstack_layers(params: Any) -> tuple[Any, tuple[Any, ...]]:
  """(the parameters without the blocks, one parameter tree per block) for `hidden(layers=...)`.
  A layer's weights sliced out of the stacked tensors inside a jitted step are a copy each time
  the step runs (a decode step would move every weight twice); split once, they are read in
  place. Costs a second copy of the blocks while the stacked tree is alive."""
  top = {k: v for k, v in params.items() if k != "layers"}
  stacked = params["layers"]["block"]
  n = jax.tree.leaves(stacked)[0].shape[0]
  return top, tuple(jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(n))


def init_params(cfg: ModelConfig, rng: Array) -> Any:
  """Boxed (logically partitioned) parameters; `nn.unbox` them for plain arrays."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  return Transformer(cfg).init(rng, tokens)["params"]


@functools.partial(jax.jit, static_argnums=0)
def _forward(cfg: ModelConfig, params, tokens, positions):
  return Transformer(cfg).apply({"params": params}, tokens, positions)[0]


def forward(cfg: ModelConfig, params, tokens: Array, positions: Array | None = None) -> Array:
  """Jitted full forward pass: float32 logits (B, T, V)."""
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  return _forward(cfg, params, tokens, positions)
