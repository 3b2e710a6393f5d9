. benchmarks/gpu_setup.sh
python3 benchmarks/breakdown.py --config.model.scan_layers=False 2>&1 | tail -11
B="python3 -m llama_jax.bench train --config configs/tinyllama_1b.py --config.model.scan_layers=False"
run() { echo "== $*"; env "$@" > $OUT/last.log 2>&1; tail -1 $OUT/last.log | tee -a $OUT/train.jsonl; grep -iE "^E|Error" $OUT/last.log | tail -2; }
run XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true $B
run XLA_FLAGS=--xla_gpu_enable_triton_gemm=false $B
run XLA_FLAGS=--xla_gpu_enable_cublaslt=true $B
run $B --config.model.remat_policy=dots_no_batch
