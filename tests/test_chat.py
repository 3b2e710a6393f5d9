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


# --- Jinja templates, against transformers' apply_chat_template on the same folders

import transformers  # noqa: E402
from conftest import CHATML, LLAMA2_CHAT, LLAMA3_CHAT, ZEPHYR_CHAT, write_hf_tokenizer  # noqa: E402

from llama_jax.tokenizer import load_tokenizer  # noqa: E402

SYSTEM = [{"role": "system", "content": "You are terse."}]
UNICODE = [{"role": "user", "content": "  你好 😀\n\nwhat is  the color?"},
           {"role": "assistant", "content": "Blue 🎉, café."}]
JINJA = {  # name: (tokenizer style, template)
    "chatml": ("chatml", CHATML),
    "llama3": ("llama3", LLAMA3_CHAT),
    "llama2": ("llama2", LLAMA2_CHAT),
    "zephyr": ("chatml", ZEPHYR_CHAT),
}


@pytest.fixture(scope="module", params=sorted(JINJA))
def jinja_folder(request, tmp_path_factory):
  style, template = JINJA[request.param]
  return write_hf_tokenizer(tmp_path_factory.mktemp(request.param), style, chat_template=template)


@pytest.mark.parametrize("messages", [CONVERSATION, SYSTEM + CONVERSATION, UNICODE], ids=["plain", "system", "unicode"])
def test_jinja_renders_and_encodes_as_transformers(jinja_folder, messages):
  tok, theirs = load_tokenizer(jinja_folder), transformers.AutoTokenizer.from_pretrained(jinja_folder)
  template = chat.template_for(tok)
  assert isinstance(template, chat.JinjaTemplate)
  assert template.render(messages) == theirs.apply_chat_template(messages, tokenize=False)
  prompt = messages[:-1]
  assert template.render_prompt(prompt) == theirs.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
  ids, mask = template.encode(messages, tok)
  assert ids == theirs.apply_chat_template(messages)["input_ids"]
  assert template.encode_prompt(prompt, tok) == theirs.apply_chat_template(prompt, add_generation_prompt=True)["input_ids"]
  # The answer tokens are the assistants' contents and the end marker after each; nothing else.
  answers = [m["content"].strip() for m in messages if m["role"] == "assistant"]
  runs, run = [], []
  for i, m in zip(ids, mask):
    if m:
      run.append(i)
    elif run:
      runs, run = runs + [run], []
  runs += [run] if run else []
  assert [tok.decode(r).strip() for r in runs] == answers
  assert all(r[-1] in tok.eos_ids for r in runs)  # each answer ends with the template's end token
  assert not any(a in tok.decode([i for i, m in zip(ids, mask) if not m]) for a in answers)


def test_jinja_answer_mask_equals_transformers_generation_blocks(tmp_path):
  # transformers marks the assistant's tokens itself where a template wraps them in
  # {% generation %}: the mask derived from the rendered turns must be the same.
  tracked = CHATML.replace("message['content'] + '<|im_end|>' + '\n'}}",
                           "''}}{% if message['role'] == 'assistant' %}{% generation %}"
                           "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}{% else %}"
                           "{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}")
  folder = write_hf_tokenizer(tmp_path, "chatml", chat_template=tracked)
  tok, theirs = load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)
  for messages in (CONVERSATION, SYSTEM + CONVERSATION, UNICODE):
    out = theirs.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = chat.template_for(tok).encode(messages, tok)
    assert ids == out["input_ids"] and [int(m) for m in mask] == out["assistant_masks"]


def test_builtin_chatml_is_the_chatml_template(tmp_path):
  tok = load_tokenizer(write_hf_tokenizer(tmp_path, "chatml"))
  builtin, jinja = chat.get_template("chatml"), chat.JinjaTemplate(CHATML)
  for messages in (CONVERSATION, SYSTEM + CONVERSATION, UNICODE):
    assert builtin.render(messages) == jinja.render(messages)
    assert builtin.render_prompt(messages[:-1]) == jinja.render_prompt(messages[:-1])
    assert builtin.encode(messages, tok)[0] == jinja.encode(messages, tok)[0]
  assert tok.token_to_id("<|im_end|>") in builtin.stop_ids(tok)


def test_template_for_picks_the_models_own_unless_named(jinja_folder, tokenizer):
  tok = load_tokenizer(jinja_folder)
  assert isinstance(chat.template_for(tok, "auto"), chat.JinjaTemplate)
  assert chat.template_for(tok, "llama-2") is chat.get_template("llama-2")
  assert chat.template_for(tokenizer) is chat.get_template("vicuna_v1.1")  # SentencePiece, no template
  with_system = chat.template_for(tok).with_system("Be kind.")
  assert with_system.render(CONVERSATION) == chat.template_for(tok).render(
      [{"role": "system", "content": "Be kind."}] + CONVERSATION)


def test_jinja_errors_are_one_line():
  with pytest.raises(ValueError, match="No filter named 'shout'") as e:
    chat.JinjaTemplate("{{ messages[0]['content'] | shout }}")
  assert "\n" not in str(e.value)
  t = chat.JinjaTemplate(LLAMA2_CHAT, {"bos_token": "<s>", "eos_token": "</s>"})
  with pytest.raises(ValueError, match="Conversation roles must alternate") as e:
    t.render([CONVERSATION[0], CONVERSATION[0]])
  assert "\n" not in str(e.value)
  with pytest.raises(ValueError, match="chat template"):
    chat.JinjaTemplate("{{ ().__class__.__mro__ }}").render(CONVERSATION)  # the sandbox
  with pytest.raises(ValueError, match="chat template"):
    chat.JinjaTemplate("{% set ns = namespace() %}{% set ns._x = 1 %}").render(CONVERSATION)


def test_jinja_tojson_and_sandbox_helpers_match_transformers(tmp_path):
  template = ("{{ messages | tojson }}|{{ messages[0] | tojson(indent=2, sort_keys=True) }}|"
              "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}")
  folder = write_hf_tokenizer(tmp_path, "chatml", chat_template=template)
  theirs = transformers.AutoTokenizer.from_pretrained(folder)
  assert chat.template_for(load_tokenizer(folder)).render(UNICODE) == theirs.apply_chat_template(UNICODE, tokenize=False)
