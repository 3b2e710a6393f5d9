"""Checkpoint conversion: Hugging Face and Meta LLaMA weights in and out, and Vicuna-style deltas;
`python -m llama_jax.convert` is the command line (`__main__`).

  source.open_source          which kind of checkpoint a path holds, and its tensors as a stream
  hf.load_hf / hf.export_hf   a Hugging Face `LlamaForCausalLM` directory (safetensors or .bin)
  meta.load_meta              Meta's `params.json` + `consolidated.NN.pth` (model-parallel shards)
  delta.apply_delta / make    Vicuna's delta weights (FastChat `apply_delta.py`)
  layout                      the tensor-name map between Hugging Face's layout and ours
  safetensors_io              a streaming reader and writer of the safetensors format
  output.check_output         where a model may be written (not over another model, other files or a run)

Loading streams tensor by tensor into preallocated arrays, so host memory stays near one copy of
the model; weights are read with safetensors or `torch.load(weights_only=True)`, never unpickled.
"""

from llama_jax.checkpoint import CheckpointError  # one error type for every checkpoint this project reads

__all__ = ["CheckpointError"]
