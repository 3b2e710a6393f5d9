"""A SentencePiece BPE model as a Hugging Face tokenizer.json that gives the same ids, for the export.

The layout is the one transformers 4 wrote for LLaMA 1/2 (`convert_slow_tokenizer.LlamaConverter`,
legacy mode), which reads text as sentencepiece does: a normalizer that prepends "▁" (the dummy
prefix) and turns spaces into "▁", no pre-tokenizer (a text is one word), BPE with byte fallback,
the control pieces as special added tokens, user-defined pieces as added tokens, and a
post-processor that prepends BOS when the tokenizer adds one.

Merges. sentencepiece's BPE merges, at each step, the adjacent pair whose union is the piece with
the best score, and its pieces are stored best first; so a merge's rank is the id of the piece it
makes (ties between two splits of one piece: the shorter left part, then the lower ids), the order
transformers' `generate_merges` gives.

Only what this layout can express converts: a BPE model with identity normalisation and extra
whitespace kept (LLaMA's settings and `tokenizer.train`'s); anything else is a TokenizerError.
"""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from llama_jax.tokenizer.files import TokenizerError

_NORMAL = sp_pb2.ModelProto.SentencePiece.NORMAL
_USER = sp_pb2.ModelProto.SentencePiece.USER_DEFINED
_SPECIAL = (sp_pb2.ModelProto.SentencePiece.CONTROL, sp_pb2.ModelProto.SentencePiece.UNKNOWN)


def merges(proto: "sp_pb2.ModelProto") -> list[tuple[str, str]]:
  vocab = {p.piece: i for i, p in enumerate(proto.pieces) if p.type == _NORMAL}  # what BPE joins
  ranked = []
  for i, p in enumerate(proto.pieces):
    if p.type != _NORMAL:
      continue
    piece = p.piece
    for cut in range(1, len(piece)):
      left, right = piece[:cut], piece[cut:]
      if left in vocab and right in vocab:
        ranked.append(((i, len(left), len(right), vocab[left], vocab[right]), (left, right)))
  return [pair for _, pair in sorted(ranked)]


def convert(tokenizer) -> Tokenizer:
  """The `tokenizers.Tokenizer` for a SentencePieceTokenizer (spm.py)."""
  proto = sp_pb2.ModelProto()
  with open(tokenizer.path, "rb") as f:
    proto.ParseFromString(f.read())
  spec, norm = proto.trainer_spec, proto.normalizer_spec
  where = f"{tokenizer.path}: cannot be written as a tokenizer.json"
  if spec.model_type != sp_pb2.TrainerSpec.BPE:
    raise TokenizerError(f"{where} (only BPE models convert, this is {sp_pb2.TrainerSpec.ModelType.Name(spec.model_type)})")
  if norm.name not in ("identity", "") or norm.remove_extra_whitespaces or spec.treat_whitespace_as_suffix:
    raise TokenizerError(f"{where} (normalisation {norm.name!r}, remove_extra_whitespaces="
                         f"{norm.remove_extra_whitespaces}: only identity with whitespace kept converts)")
  vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
  unk = proto.pieces[spec.unk_id].piece if 0 <= spec.unk_id < len(proto.pieces) else None
  tok = Tokenizer(models.BPE(vocab=vocab, merges=merges(proto), unk_token=unk, fuse_unk=True,
                             byte_fallback=spec.byte_fallback))
  steps = [normalizers.Prepend("▁")] if norm.add_dummy_prefix else []
  tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
  tail = [decoders.Strip(" ", 1, 0)] if norm.add_dummy_prefix else []
  tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()] + tail)
  tok.add_special_tokens([AddedToken(p.piece, normalized=False, special=True)
                          for p in proto.pieces if p.type in _SPECIAL])
  tok.add_tokens([AddedToken(p.piece, normalized=False, special=False) for p in proto.pieces if p.type == _USER])
  # The special tokens encode adds (transformers' LlamaTokenizer: BOS before, EOS after if asked).
  first = tokenizer.id_to_piece(tokenizer.bos_id) if tokenizer.add_bos else None
  last = tokenizer.id_to_piece(tokenizer.eos_id) if tokenizer._adds_eos else None  # pylint: disable=protected-access

  def sequence(name: str, type_id: int) -> str:
    return " ".join(f"{piece}:{type_id}" for piece in (first, f"${name}", last) if piece)
  if first or last:
    ids = {first: tokenizer.bos_id, last: tokenizer.eos_id}
    tok.post_processor = processors.TemplateProcessing(
        single=sequence("A", 0), pair=f"{sequence('A', 0)} {sequence('B', 1)}",
        special_tokens=[(piece, ids[piece]) for piece in (first, last) if piece])
  return tok


def write(tokenizer, path: str) -> None:
  convert(tokenizer).save(path)
