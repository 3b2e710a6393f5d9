#!/usr/bin/env bash
# Quantization quality on the CPU: train the tiny model (configs/tiny.py, FFN width 768 so that
# groups of 128 divide every projection), quantize it to int8, int4 round-to-nearest and int4 GPTQ
# (group 128), and print one perplexity table. Text the model never trained on (it trained on the
# standard library): GPTQ calibrates on numpy's sources and everything is evaluated on JAX's.
#   bash benchmarks/quantize_quality.sh [RUN_DIR]      (about 15 minutes on 2 idle cores)
set -euo pipefail
RUN=${1:-runs/tiny768}
PY=${PYTHON:-python}
if [ ! -d "$RUN/checkpoints" ]; then
  $PY train.py --config configs/tiny.py --workdir "$RUN" --config.model.multiple_of=128
fi
$PY - "$RUN" <<'PYEOF'
import glob, os, sys
import jax, numpy
def text(package, pattern, limit):
  files = sorted(glob.glob(os.path.join(os.path.dirname(package.__file__), pattern), recursive=True))
  out, size = [], 0
  for f in files:
    out.append(open(f, encoding="utf-8", errors="replace").read())
    size += len(out[-1])
    if size > limit:
      break
  return "\n\n".join(out)
run = sys.argv[1]
open(os.path.join(run, "calibration.txt"), "w").write(text(numpy, "lib/*.py", 400_000))
open(os.path.join(run, "eval.txt"), "w").write(text(jax, "_src/numpy/*.py", 400_000))
PYEOF
$PY -m llama_jax.quantize --model "$RUN" --output "$RUN-int8" --bits 8
$PY -m llama_jax.quantize --model "$RUN" --output "$RUN-int4-rtn" --bits 4 --group_size 128
$PY -m llama_jax.quantize --model "$RUN" --output "$RUN-int4-gptq" --bits 4 --group_size 128 \
    --method gptq --calibration "$RUN/calibration.txt" --calibration_samples 128 --calibration_len 256
$PY -m llama_jax.evaluate perplexity --data "$RUN/eval.txt" --seq_len 256 --no_progress \
    --model "$RUN" --model "$RUN-int8" --model "$RUN-int4-rtn" --model "$RUN-int4-gptq"
