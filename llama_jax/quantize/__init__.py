"""Weight-only quantization: int8 and int4 (packed two a byte) with round-to-nearest or GPTQ;
`python -m llama_jax.quantize` is the command line (`__main__`).

  grid         the integer grid: group size, symmetric or asymmetric, scale and zero point
  rtn          round-to-nearest, a weight at a time
  gptq         GPTQ's solver over one layer's weight and Hessian (Frantar et al. 2022)
  calibration  calibration text as token windows
  layers       the model pass: layer by layer over calibration activations, true-sequential

A quantized weight is data, not a new model: `llama_jax.projection.QuantizedTensor` takes the
weight's place in the parameter tree and `model._project` applies it; `llama_jax.load` reads the
checkpoints written here.
"""
