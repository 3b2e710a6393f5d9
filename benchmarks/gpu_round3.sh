# Profiles (training step, decode step), decode variants, then the PyTorch decode reference.
. benchmarks/gpu_setup.sh
T="python3 -m llama_jax.bench train --config configs/tinyllama_1b.py --config.model.scan_layers=False"
D="python3 -m llama_jax.bench decode --config configs/tinyllama_1b.py --prompt_len 128 --new_tokens 256 --repeats 3"
CB="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL --xla_gpu_graph_min_graph_size=1"
$T --steps 5 --profile_dir /tmp/pt > $OUT/t.log 2>&1; tail -1 $OUT/t.log
python3 benchmarks/profile_summary.py /tmp/pt --top 30
$D --batch_size 1 --repeats 1 --profile_dir /tmp/pd > $OUT/d.log 2>&1; tail -1 $OUT/d.log
python3 benchmarks/profile_summary.py /tmp/pd --top 30
run() { echo "== $*"; env "$@" > $OUT/last.log 2>&1; tail -1 $OUT/last.log | tee -a $OUT/decode.jsonl; grep -E "^E|Error" $OUT/last.log | tail -2; }
run XLA_FLAGS="$CB" $D --batch_size 1
run XLA_FLAGS="$CB" $D --batch_size 1 --config.model.scan_layers=False
run XLA_FLAGS="$CB" $D --batch_size 16 --config.model.scan_layers=False
for b in 1 16; do for c in dynamic static; do
  timeout 150 python3 benchmarks/reference_torch.py decode --batch_size $b --cache $c 2>&1 | tail -1 | tee -a $OUT/decode.jsonl
done; done
