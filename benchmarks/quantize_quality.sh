#!/usr/bin/env bash
# Quantization quality on the CPU: train the tiny model (configs/tiny.py, FFN width 768 so that
# groups of 128 divide every projection), quantize it to int8, int4 by round-to-nearest and int4 by
# GPTQ (groups of 128, and one group per output channel), and print one perplexity table. The model
# trained on the standard library; GPTQ calibrates on the `email` package's sources and everything
# is evaluated on `asyncio`'s (disjoint files).
#   bash benchmarks/quantize_quality.sh [RUN_DIR]      (about 20 minutes on 2 idle cores)
set -euo pipefail
RUN=${1:-runs/tiny768}
PY=${PYTHON:-python}
if [ ! -d "$RUN/checkpoints" ]; then
  $PY train.py --config configs/tiny.py --workdir "$RUN" --config.model.multiple_of=128
fi
$PY - "$RUN" <<'PYEOF'
import glob, os, sys, sysconfig
def text(pattern, limit):
  root = sysconfig.get_paths()["stdlib"]
  out, size = [], 0
  for f in sorted(glob.glob(os.path.join(root, pattern), recursive=True)):
    out.append(open(f, encoding="utf-8", errors="replace").read())
    size += len(out[-1])
    if size > limit:
      break
  return "\n\n".join(out)
run = sys.argv[1]
open(os.path.join(run, "calibration.txt"), "w").write(text("email/**/*.py", 400_000))
open(os.path.join(run, "eval.txt"), "w").write(text("asyncio/*.py", 400_000))
PYEOF
Q="$PY -m llama_jax.quantize --model $RUN"
GPTQ="--method gptq --calibration $RUN/calibration.txt --calibration_samples 128 --calibration_len 256"
[ -d "$RUN-int8" ] || $Q --output "$RUN-int8" --bits 8
[ -d "$RUN-int4-rtn" ] || $Q --output "$RUN-int4-rtn" --bits 4 --group_size 128
[ -d "$RUN-int4-gptq" ] || $Q --output "$RUN-int4-gptq" --bits 4 --group_size 128 $GPTQ
[ -d "$RUN-int4pc-rtn" ] || $Q --output "$RUN-int4pc-rtn" --bits 4 --group_size 0
[ -d "$RUN-int4pc-gptq" ] || $Q --output "$RUN-int4pc-gptq" --bits 4 --group_size 0 $GPTQ
$PY -m llama_jax.evaluate perplexity --data "$RUN/eval.txt" --seq_len 256 --no_progress --model "$RUN" \
    --model "$RUN-int8" --model "$RUN-int4-rtn" --model "$RUN-int4-gptq" --model "$RUN-int4pc-rtn" \
    --model "$RUN-int4pc-gptq"
