# FSDP over two GPUs (nvidia-h200-x2): tokens/s per GPU against one GPU of the same machine, same
# per-GPU batch (8 x 2048). Not yet run. Results: $OUT/fsdp.jsonl.
. benchmarks/gpu_setup.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
T="python3 -m llama_jax.bench train --config configs/tinyllama_1b.py"
run() { echo "== $*"; env "$@" > $OUT/last.log 2>&1; tail -1 $OUT/last.log | tee -a $OUT/fsdp.jsonl; grep -E "^E|Error" $OUT/last.log | tail -2; }
run CUDA_VISIBLE_DEVICES=0 $T
run XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true $T --config.batch_size=16 --config.mesh.fsdp=2
run XLA_FLAGS= $T --config.batch_size=16 --config.mesh.fsdp=2
