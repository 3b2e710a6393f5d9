import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import train_word_tokenizer, write_hf_tokenizer

import llama_jax
from llama_jax import model as M
from llama_jax import sharding
from llama_jax.config import ModelConfig
from llama_jax.generate import engine, generate_tokens
from llama_jax.generate.generator import make_batch
from llama_jax.generate.sampling import SamplingParams
from llama_jax.generate.streaming import TextStreamer
from llama_jax.tokenizer import Tokenizer

TINY = ModelConfig(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=320, multiple_of=16,
                   max_seq_len=64)
GREEDY = {}
SAMPLED = dict(temperature=1.0, top_k=20, top_p=0.9)


@pytest.fixture(scope="module")
def params():
  return nn.unbox(M.init_params(TINY, jax.random.key(0)))


def _prompts(lengths, seed=1):
  rng = np.random.default_rng(seed)
  return [[1] + rng.integers(3, TINY.vocab_size, n - 1).tolist() for n in lengths]


def _full_logits(params, sequences):
  """Float32 logits of a full (uncached) forward pass over each sequence, right-padded to one
  length (causal attention: the padding changes nothing before it)."""
  width = max(map(len, sequences))
  tokens = np.zeros((len(sequences), width), np.int32)
  for i, s in enumerate(sequences):
    tokens[i, :len(s)] = s
  return np.asarray(M.forward(TINY, params, jnp.asarray(tokens)))


def test_cached_logits_equal_full_forward_at_every_step(params):
  prompts = _prompts([5, 11, 3])
  out = generate_tokens(TINY, params, prompts, 6, return_logits=True)
  full = _full_logits(params, [p + new for p, (new, _) in zip(prompts, out)])
  for row, (prompt, (new, logits)) in enumerate(zip(prompts, out)):
    assert len(new) == 6 and logits.shape == (6, TINY.vocab_size)
    for s in range(6):  # token s was drawn from the logits at position len(prompt) - 1 + s
      np.testing.assert_allclose(logits[s], full[row, len(prompt) - 1 + s], rtol=1e-5, atol=1e-5)


def test_scanned_and_unrolled_configs_decode_alike(params):
  # The engine runs per-layer weights either way; the config's scan_layers must not matter.
  unrolled = dataclasses.replace(TINY, scan_layers=False)
  prompts = _prompts([5, 11, 3])
  scanned = generate_tokens(TINY, params, prompts, 6, seed=2, return_logits=True, **SAMPLED)
  split = generate_tokens(unrolled, params, prompts, 6, seed=2, return_logits=True, **SAMPLED)
  for (tokens_a, logits_a), (tokens_b, logits_b) in zip(scanned, split):
    assert tokens_a == tokens_b
    np.testing.assert_allclose(logits_b, logits_a, rtol=1e-5, atol=1e-5)


def _prefill(cfg, params, prompts, max_new, sampling=None):
  batch = make_batch(cfg, prompts, list(range(len(prompts))), max_new)
  b = batch.tokens.shape[0]
  sampling = sampling or SamplingParams.make(b)
  state = engine.prefill(cfg, params, jnp.asarray(batch.tokens), jnp.asarray(batch.prompt_lengths),
                         jnp.asarray(batch.limits), jax.random.split(jax.random.key(0), b),
                         jax.tree.map(jnp.asarray, sampling), jnp.array([-1]),
                         cache_len=batch.cache_len, budget=batch.budget)
  return batch, state


@pytest.mark.slow
def test_decode_step_copies_neither_cache_nor_weights():
  # XLA's own accounting of the compiled loop's scratch memory: a step that sliced and restacked
  # the cache (or copied weights out of stacked tensors) needs scratch of the cache's size; one
  # that updates the carried buffers in place needs little beyond the logits.
  cfg = dataclasses.replace(TINY, max_seq_len=1024)
  params = engine.prepare_params(cfg, nn.unbox(M.init_params(cfg, jax.random.key(0))))
  batch, state = _prefill(cfg, params, _prompts([5] * 4), 1000)
  compiled = engine.decode.lower(cfg, params, state, jnp.array(batch.budget)).compile()
  scratch = compiled.memory_analysis().temp_size_in_bytes
  layer_cache = sum(x.nbytes for x in jax.tree.leaves(state.cache)) // cfg.n_layers
  # measured before the in-place cache: 1.5x (scanned) and 1.7x (unrolled) the whole cache
  assert scratch < layer_cache, (scratch, layer_cache)


def test_greedy_equals_argmax_rollout_without_cache(params):
  prompt = _prompts([7])[0]
  new = generate_tokens(TINY, params, [prompt], 8)[0]
  tokens = list(prompt)
  for _ in range(8):  # a fixed padded width, so the uncached forward compiles once
    logits = _full_logits(params, [tokens + [0] * (16 - len(tokens))])
    tokens.append(int(np.argmax(logits[0, len(tokens) - 1])))
  assert new == tokens[len(prompt):]


@pytest.mark.parametrize("config", [GREEDY, SAMPLED])
def test_batch_of_different_lengths_equals_prompts_one_by_one(params, config):
  prompts = _prompts([9, 2, 14, 4, 6])
  together = generate_tokens(TINY, params, prompts, 7, seed=3, batch_size=4, **config)
  alone = generate_tokens(TINY, params, prompts, 7, seed=3, batch_size=1, **config)
  assert together == alone
  if not config:  # greedy: the same as a call with the one prompt only
    assert alone[1] == generate_tokens(TINY, params, [prompts[1]], 7)[0]


def test_a_batch_mixes_greedy_and_sampled_rows(params):
  # Per-row settings: each row gets what it gets alone with its own settings.
  prompts = _prompts([6, 6, 9])
  settings = [(0.0, 0, 1.0), (1.0, 20, 0.9), (0.7, 0, 1.0)]
  mixed = generate_tokens(TINY, params, prompts, 7, seed=4, temperature=[s[0] for s in settings],
                          top_k=[s[1] for s in settings], top_p=[s[2] for s in settings])
  for i, (t, k, p) in enumerate(settings):
    alone = generate_tokens(TINY, params, prompts, 7, seed=4, temperature=t, top_k=k, top_p=p)
    assert mixed[i] == alone[i]


def test_eos_stops_a_row_and_only_that_row(params):
  prompts = _prompts([4, 6])
  free = generate_tokens(TINY, params, prompts, 10)
  # an EOS id that row 0 draws at step 3 (and not before), and row 1 never draws
  step = next(s for s in range(3, 10) if free[0][s] not in free[0][:s] and free[0][s] not in free[1])
  eos = free[0][step]
  stopped = generate_tokens(TINY, params, prompts, 10, eos_ids=[eos])
  assert stopped[0] == free[0][:step + 1]
  assert stopped[1] == free[1]
  # several EOS ids: any of them stops a row
  other = free[1][4]
  both = generate_tokens(TINY, params, prompts, 10, eos_ids=[eos, other])
  assert both[0] == free[0][:free[0].index(other) + 1 if other in free[0][:step] else step + 1]
  assert both[1] == free[1][:free[1].index(other) + 1]


def test_no_recompile_for_new_prompts_or_sampling_settings_of_the_same_bucket(params):
  generate_tokens(TINY, params, _prompts([5, 9]), 5)
  before = dict(engine.TRACE_COUNTS)
  out = generate_tokens(TINY, params, _prompts([12, 3], seed=7), 9)
  for t, k, p in ((0.5, 0, 1.0), (1.3, 7, 1.0), (0.9, 0, 0.8), (2.0, 40, 0.5)):
    generate_tokens(TINY, params, _prompts([12, 3], seed=7), 9, temperature=t, top_k=k, top_p=p)
  assert dict(engine.TRACE_COUNTS) == before
  assert [len(o) for o in out] == [9, 9]


def test_streaming_chunks_make_the_same_tokens(params):
  prompt = _prompts([5])[0]
  chunks = []
  streamed = generate_tokens(TINY, params, [prompt], 16, seed=5, stream=chunks.append, **SAMPLED)
  oneshot = generate_tokens(TINY, params, [prompt], 16, seed=5, **SAMPLED)
  assert streamed == oneshot
  assert len(chunks) > 1 and sum(chunks, []) == streamed[0]


def test_tensor_parallel_mesh_gives_the_same_tokens(params):
  mesh = sharding.make_mesh(data=1, fsdp=1, tensor=2, devices=jax.devices()[:2])
  prompts = _prompts([6, 13])
  sharded = generate_tokens(TINY, params, prompts, 6, mesh=mesh)
  assert sharded == generate_tokens(TINY, params, prompts, 6)
  placed = engine.prepare_params(TINY, params, mesh)
  assert len(placed.layers[0]["attention"]["wk"].sharding.device_set) == 2


@pytest.mark.slow
def test_the_engine_places_the_cache_by_the_rules_it_is_given(params):
  # The same mesh, two rules tables: K/V heads split over `tensor` (the default) or replicated.
  mesh = sharding.make_mesh(data=1, fsdp=1, tensor=2, devices=jax.devices()[:2])
  replicated_kv = tuple((name, None if name in ("kv_heads", "heads") else axes)
                        for name, axes in sharding.DEFAULT_RULES)
  batch = make_batch(TINY, _prompts([6]), [0], 4)
  for rules, split in ((sharding.DEFAULT_RULES, True), (replicated_kv, False)):
    ep = engine.prepare_params(TINY, params, mesh, rules)
    state = engine.prefill(TINY, ep, jnp.asarray(batch.tokens), jnp.asarray(batch.prompt_lengths),
                           jnp.asarray(batch.limits), jax.random.split(jax.random.key(0), 1),
                           jax.tree.map(jnp.asarray, SamplingParams.make(1)), jnp.array([-1]),
                           cache_len=batch.cache_len, budget=batch.budget, mesh=mesh, rules=rules)
    k = state.cache[0].k
    assert k.sharding.is_fully_replicated != split, rules
  out = generate_tokens(TINY, params, _prompts([6]), 4, mesh=mesh, rules=replicated_kv)
  assert out == generate_tokens(TINY, params, _prompts([6]), 4)


def test_context_limits(params):
  with pytest.raises(ValueError, match="context is 64 tokens"):
    generate_tokens(TINY, params, _prompts([65]), 4)
  with pytest.raises(ValueError, match="empty"):
    generate_tokens(TINY, params, [[]], 4)
  with pytest.raises(ValueError, match="temperature must be >= 0"):
    generate_tokens(TINY, params, _prompts([5]), 4, temperature=-1.0)
  # a prompt that nearly fills the context gets as many tokens as fit (the last needs no slot)
  out = generate_tokens(TINY, params, _prompts([60]), 30)
  assert len(out[0]) == 5


def test_a_top_k_past_int32_cuts_nothing(params):
  # Any int is a valid top_k; one of the vocabulary's size or more keeps every token, as 0 does.
  sampled = dict(temperature=1.0, seed=3)
  assert (generate_tokens(TINY, params, _prompts([5]), 4, top_k=2 ** 31, **sampled)
          == generate_tokens(TINY, params, _prompts([5]), 4, top_k=0, **sampled))


def test_cache_is_in_the_compute_dtype(params):
  cfg = dataclasses.replace(TINY, dtype="bfloat16")
  _, state = _prefill(cfg, engine.prepare_params(cfg, params), _prompts([3]), 4)
  assert len(state.cache) == 2
  assert state.cache[0].k.dtype == jnp.bfloat16 and state.cache[0].k.shape == (1, 2, 32, 8)


# --- strings through llama_jax.Model


@pytest.fixture(scope="module")
def text_model(tmp_path_factory, params):
  root = tmp_path_factory.mktemp("sp")
  train_word_tokenizer(root, TINY.vocab_size)
  return llama_jax.Model(TINY, params, Tokenizer(root / "sp.model"))


def test_same_seed_same_text(text_model):
  kwargs = dict(max_new_tokens=12, temperature=1.0, top_k=20, top_p=0.9)
  a = text_model.generate(["the cat", "a dog ran"], seed=11, **kwargs)
  b = text_model.generate(["the cat", "a dog ran"], seed=11, **kwargs)
  assert a == b and all(isinstance(t, str) for t in a)
  others = [text_model.generate(["the cat", "a dog ran"], seed=s, **kwargs) for s in (12, 13)]
  assert any(o != a for o in others)


def test_string_prompts_and_text_streaming(text_model):
  pieces = []
  text = text_model.generate(["the big tree"], max_new_tokens=16, stream=pieces.append)[0]
  assert "".join(pieces) == text
  ids = text_model.tokenizer.encode("the big tree")
  out = text_model.generate([ids], max_new_tokens=16)[0]
  assert out[:len(ids)] == ids
  eos = text_model.tokenizer.eos_id
  # the prompt's text and the continuation's make the whole text, spaces included
  assert "the big tree" + text == text_model.tokenizer.decode([t for t in out if t != eos])


def test_continuation_keeps_the_space_before_its_first_word(text_model):
  tok = text_model.tokenizer
  prompt, new = tok.encode("the cat"), tok.encode("sat on", bos=False)  # "▁sat", "▁on"
  assert tok.decode(new) == "sat on"  # alone, SentencePiece drops the first piece's space
  assert tok.decode_continuation(prompt, new) == " sat on"


class _CountingTokenizer:
  """A tokenizer whose decode counts the ids it is given."""

  def __init__(self, tok):
    self.tok, self.decoded = tok, 0

  def decode(self, ids):
    self.decoded += len(ids)
    return self.tok.decode(ids)


def test_streaming_decodes_a_bounded_window_per_chunk(text_model):
  # Streaming n tokens must decode O(n) ids in all, not the whole answer again at every chunk.
  tok = text_model.tokenizer
  answer = tok.encode(" ".join(["the cat sat on a mat"] * 60), bos=False)  # ~400 tokens
  prompt = tok.encode("the dog")
  counting = _CountingTokenizer(tok)
  pieces = []
  streamer = TextStreamer(counting, pieces.append, tok.eos_ids, prompt)
  for t in answer:
    streamer([t])
  streamer.flush()
  assert "".join(pieces) == tok.decode_continuation(prompt, answer)
  assert counting.decoded < 20 * len(answer), counting.decoded  # quadratic: ~len(answer)**2


def test_streaming_writes_an_answer_that_changes_how_its_prompt_ends(text_model):
  # A token-id prompt ending mid-character (<0xE2><0x82>), completed by the answer's first token
  # (<0xAC>, "€"): the prompt's text is no prefix of the whole any more, and the streamer must still
  # write the answer's text (decode_continuation's: the new tokens alone), chunked any way.
  tok = text_model.tokenizer
  byte = {tok.id_to_piece(i): i for i in range(tok.vocab_size)}
  prompt = tok.encode("the cat") + [byte["<0xE2>"], byte["<0x82>"]]
  new = [byte["<0xAC>"]] + tok.encode("sat on a mat", bos=False)
  expected = tok.decode_continuation(prompt, new)
  assert expected.endswith(" sat on a mat")
  for chunks in ([new], [[t] for t in new], [new[:2], new[2:]]):
    pieces = []
    streamer = TextStreamer(tok, pieces.append, tok.eos_ids, prompt)
    for chunk in chunks:
      streamer(chunk)
    streamer.flush()
    assert "".join(pieces) == expected, chunks


def test_streaming_after_a_prompt_window_that_starts_inside_a_character(tmp_path):
  # A Llama 2 tokenizer.json spells "猫狗" as six byte pieces: the prompt's last five tokens start
  # inside "猫". A byte-fallback decoder turns a whole run of byte pieces that is not UTF-8 into
  # U+FFFD, the answer's first bytes (those of "ꙮ") with it; the window must start after the cut.
  from llama_jax.tokenizer import load_tokenizer
  tok = load_tokenizer(write_hf_tokenizer(tmp_path, "llama2"))
  prompt = tok.encode("猫狗")
  assert [tok.id_to_piece(i) for i in prompt[-5:]] == ["<0x8C>", "<0xAB>", "<0xE7>", "<0x8B>", "<0x97>"]
  new = tok.encode("猫狗ꙮ ok")[len(prompt):]
  assert tok.id_to_piece(new[0]) == "<0xEA>" and tok.decode_continuation(prompt, new) == "ꙮ ok"
  for chunks in ([new], [[t] for t in new]):
    pieces = []
    streamer = TextStreamer(tok, pieces.append, tok.eos_ids, prompt)
    for chunk in chunks:
      streamer(chunk)
    streamer.flush()
    assert "".join(pieces) == "ꙮ ok", chunks
