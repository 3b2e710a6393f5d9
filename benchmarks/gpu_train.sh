# Training throughput, JAX variants then the PyTorch reference. Results: $OUT/train.jsonl.
. benchmarks/gpu_setup.sh
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
bench() {
  echo "== $*"
  python3 -m llama_jax.bench train --config configs/tinyllama_1b.py "$@" > $OUT/last.log 2>&1
  tail -1 $OUT/last.log | tee -a $OUT/train.jsonl
  grep -iE "error|Error" $OUT/last.log | tail -3
}
bench
for v in "$@"; do bench $v; done
python3 benchmarks/reference_torch.py train 2>&1 | tail -1 | tee -a $OUT/train.jsonl
