# Decode on per-layer weights with the in-place cache, and training with the chunked loss
# (commits of 2026-11-23, second session; not yet run: no GPU was lent that session).
# One device call, about 6 minutes on an H100. Before it, here: fetch the ml-collections wheel
# (device README: pip download ... -d .whl ml_collections==1.1.0) and carry .whl.
# Results: $OUT/decode.jsonl, $OUT/train.jsonl; compare with BENCHMARKS.md's rows of 2026-11-23.
. benchmarks/gpu_setup.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
D="python3 -m llama_jax.bench decode --config configs/tinyllama_1b.py --prompt_len 128 --new_tokens 256 --repeats 3"
CB="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL --xla_gpu_graph_min_graph_size=1"
run() { echo "== $*"; env "$@" > $OUT/last.log 2>&1; tail -1 $OUT/last.log | tee -a $OUT/$FILE; grep -E "^E|Error" $OUT/last.log | tail -2; }
# Predicted: no weight slices and no cache restacking per step; batch 1 from 2.74 ms/step toward
# the 0.73 ms floor if the copies were what cuBLAS matvecs paid for (see BENCHMARKS.md).
FILE=decode.jsonl
run XLA_FLAGS="$CB --xla_gpu_enable_triton_gemm=false" $D --batch_size 1
run XLA_FLAGS="$CB" $D --batch_size 1
run XLA_FLAGS="$CB --xla_gpu_enable_triton_gemm=false" $D --batch_size 16
run XLA_FLAGS="$CB" $D --batch_size 16
# Predicted: about 4 GB less peak memory with chunks; step time within a few ms either way.
FILE=train.jsonl
T="python3 -m llama_jax.bench train --config configs/tinyllama_1b.py"
run XLA_FLAGS= $T
run XLA_FLAGS= $T --config.model.loss_chunk_len=256
run XLA_FLAGS= $T --config.model.loss_chunk_len=512
