# Decode: cuBLAS instead of Triton for the matrix-vector products, with command buffers.
. benchmarks/gpu_setup.sh
D="python3 -m llama_jax.bench decode --config configs/tinyllama_1b.py --prompt_len 128 --new_tokens 256 --repeats 3"
CB="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL --xla_gpu_graph_min_graph_size=1"
run() { echo "== $*"; env "$@" > $OUT/last.log 2>&1; tail -1 $OUT/last.log | tee -a $OUT/decode.jsonl; grep -E "^E|Error" $OUT/last.log | tail -2; }
run XLA_FLAGS="$CB --xla_gpu_enable_triton_gemm=false" $D --batch_size 1
run XLA_FLAGS="$CB --xla_gpu_enable_triton_gemm=false" $D --batch_size 16
run XLA_FLAGS="$CB" $D --batch_size 1
