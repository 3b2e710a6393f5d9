import random

import pytest
import sentencepiece as spm

from llama_jax.tokenizer import chat
from llama_jax.tokenizer import Tokenizer

CONVERSATION = [
    {"role": "user", "content": "Hello!"},
    {"role": "assistant", "content": "Hi there."},
    {"role": "user", "content": "How are you?"},
    {"role": "assistant", "content": "I am good."},
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  root = tmp_path_factory.mktemp("sp")
  rng = random.Random(0)
  words = "hello hi there how are you i am good the cat sat on a mat USER ASSISTANT INST SYS".split()
  lines = [" ".join(rng.choice(words) for _ in range(10)) + rng.choice([".", "!", "?", ":"])
           for _ in range(1500)]
  (root / "corpus.txt").write_text("\n".join(lines))
  spm.SentencePieceTrainer.train(input=str(root / "corpus.txt"), model_prefix=str(root / "sp"),
                                 vocab_size=300, model_type="bpe", byte_fallback=True, minloglevel=2)
  return Tokenizer(root / "sp.model")


def test_vicuna_prompt_matches_fastchat():
  # FastChat's vicuna_v1.1 get_prompt() after appending the two turns and (USER, q2), (ASSISTANT, None)
  expected = ("A chat between a curious user and an artificial intelligence assistant. The assistant "
              "gives helpful, detailed, and polite answers to the user's questions. USER: Hello! "
              "ASSISTANT: Hi there.</s>USER: How are you? ASSISTANT:")
  assert chat.get_template("vicuna_v1.1").render_prompt(CONVERSATION[:3]) == expected
  full = expected + " I am good.</s>"
  assert chat.get_template("vicuna_v1.1").render(CONVERSATION) == full


def test_system_message_overrides_default():
  t = chat.get_template("vicuna_v1.1")
  text = t.render_prompt([{"role": "system", "content": "Be brief."}, CONVERSATION[0]])
  assert text == "Be brief. USER: Hello! ASSISTANT:"
  assert t.with_system("Terse.").render_prompt(CONVERSATION[:1]) == "Terse. USER: Hello! ASSISTANT:"


def test_llama2_matches_meta_chat_completion():
  # Meta's chat_completion, with "<s>"/"</s>" for the BOS/EOS it puts between turns (the first BOS
  # is the encoder's).
  t = chat.get_template("llama-2")
  messages = [{"role": "system", "content": "Be kind."}] + CONVERSATION[:3]
  assert t.render_prompt(messages) == (
      "[INST] <<SYS>>\nBe kind.\n<</SYS>>\n\nHello! [/INST] Hi there. </s><s>[INST] How are you? [/INST]")


@pytest.mark.parametrize("name", sorted(chat.TEMPLATES))
def test_segments_concatenate_and_mark_exactly_the_answers(name):
  t = chat.get_template(name)
  segments = t.segments(CONVERSATION)
  assert "".join(s for s, _ in segments) == t.render(CONVERSATION)
  answers = [s for s, is_answer in segments if is_answer]
  if name == "llama-2":
    assert answers == ["Hi there. </s>", "I am good. </s>"]
  else:
    assert answers == [f"Hi there.{t.stop_token}", f"I am good.{t.stop_token}"]
  # the prompt for turn 2 is the training text up to the second answer
  prompt = t.render_prompt(CONVERSATION[:3])
  assert t.render(CONVERSATION).startswith(prompt)


def test_bad_conversations_are_errors():
  t = chat.get_template()
  with pytest.raises(ValueError, match="alternate"):
    t.render([{"role": "assistant", "content": "x"}])
  with pytest.raises(ValueError, match="end with a user"):
    t.render_prompt(CONVERSATION)
  with pytest.raises(ValueError, match="unknown chat template"):
    chat.get_template("nope")


def test_encode_maps_markers_to_ids_and_masks_answers(tokenizer):
  t = chat.get_template("vicuna_v1.1")
  ids, mask = t.encode(CONVERSATION, tokenizer)
  assert ids[0] == tokenizer.bos_id and not mask[0]
  # each answer ends with the EOS id, which is in the loss; "</s>" never appears as characters
  eos_positions = [i for i, x in enumerate(ids) if x == tokenizer.eos_id]
  assert len(eos_positions) == 2 and all(mask[i] for i in eos_positions)
  assert "</s>" not in tokenizer.decode(ids)
  # the answer tokens decode to the answers; the prompt tokens to everything else
  answer_text = tokenizer.decode([x for x, m in zip(ids, mask) if m and x != tokenizer.eos_id])
  assert answer_text.replace(" ", "") == "Hithere.Iamgood."
  prompt_ids = [x for x, m in zip(ids, mask) if not m]
  assert "ASSISTANT" in tokenizer.decode(prompt_ids) and "Hi" not in tokenizer.decode(prompt_ids)
  # the generation prompt's ids are a prefix of the training ids
  prompt = t.encode_prompt(CONVERSATION[:3], tokenizer)
  assert ids[:len(prompt)] == prompt
