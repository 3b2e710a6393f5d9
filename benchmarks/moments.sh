# bfloat16 against float32 Adam moments (optimizer.moments_dtype): the tiny model on the bundled
# corpus, seeds 0 and 1 of each, then the four loss curves side by side (compare_curves.py: the gap
# between the two moment types at one seed beside the gap between two seeds of one type).
#   bash benchmarks/moments.sh OUT_DIR [train.py overrides...]
# On a GPU: `bash benchmarks/gpu.sh moments` (1000 steps of the default batch); on this project's
# 2-core CPU: `PYTHON=.venv/bin/python bash benchmarks/moments.sh /tmp/moments --config.num_steps=400 --config.batch_size=8`.
set -euo pipefail
PYTHON=${PYTHON:-python3}
out=$1; shift
mkdir -p "$out"
for m in float32 bfloat16; do
  for seed in 0 1; do
    rm -rf "$out/run_${m}_$seed"
    $PYTHON train.py --config configs/default.py --workdir "$out/run_${m}_$seed" --config.seed=$seed \
      --config.optimizer.moments_dtype=$m --config.eval_every=100 "$@" > "$out/${m}_$seed.log" 2>&1 \
      || { tail -5 "$out/${m}_$seed.log"; exit 1; }
    cp "$out/run_${m}_$seed/metrics.jsonl" "$out/moments_${m}_$seed.jsonl"
  done
done
$PYTHON benchmarks/compare_curves.py "$out"/moments_*.jsonl | tee "$out/moments.txt"
