# Quantization and LoRA on one GPU, TinyLlama-1.1B shape, random weights: the GPU numbers of the
# quantization/LoRA issue. Each line prints one JSON object last. About 20 minutes in all: run it
# in the parts below (each well inside a 10-minute device command), after `source benchmarks/gpu_setup.sh`.
#   bash benchmarks/gpu_quantize.sh decode | gptq | lora
set -euo pipefail
B="python -m llama_jax.bench"
C="--config configs/tinyllama_1b.py"
case "${1:-}" in
  decode)  # bf16 against weight-only int8 (per channel) and int4 (groups of 128), batch 1 and 16
    for b in 1 16; do
      for q in none int8 int4; do
        $B decode $C --batch_size $b --prompt_len 128 --new_tokens 256 --quantize "${q/none/}" 2>&1 | tail -1
      done
    done ;;
  gptq)  # the whole model, 128 calibration windows of 2048 tokens, as the paper
    $B quantize $C --bits 4 --method gptq --group_size 128 --calibration_samples 128 --calibration_len 2048 2>&1 | tail -1 ;;
  lora)  # full fine-tuning against LoRA r=16 on a bf16-computed float32 base, and on an int4 base
    $B train $C --steps 10 2>&1 | tail -1
    $B train $C --steps 10 --config.lora.rank=16 2>&1 | tail -1
    $B train $C --steps 10 --config.lora.rank=16 --config.lora.quantize_base=int4 2>&1 | tail -1 ;;
  *) echo "usage: bash benchmarks/gpu_quantize.sh decode|gptq|lora" >&2; exit 2 ;;
esac
