# Default-config training, prefill of a long prompt, and kernel profiles of a training and a decode step.
. benchmarks/gpu_setup.sh
D="python3 -m llama_jax.bench decode --config configs/tinyllama_1b.py"
python3 -m llama_jax.bench train --config configs/tinyllama_1b.py > $OUT/t.log 2>&1; tail -1 $OUT/t.log
$D --batch_size 1 --prompt_len 1920 --new_tokens 128 --repeats 3 > $OUT/p.log 2>&1; tail -1 $OUT/p.log
$D --batch_size 1 --prompt_len 128 --new_tokens 256 --repeats 1 --profile_dir /tmp/pd > $OUT/d.log 2>&1; tail -1 $OUT/d.log
python3 benchmarks/profile_summary.py /tmp/pd --top 25 2>&1 | grep -v Deprecation
python3 -m llama_jax.bench train --config configs/tinyllama_1b.py --steps 3 --warmup 2 --profile_dir /tmp/pt > $OUT/t2.log 2>&1
python3 benchmarks/profile_summary.py /tmp/pt --top 25 2>&1 | grep -v Deprecation
