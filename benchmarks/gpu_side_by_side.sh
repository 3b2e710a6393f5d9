# One-GPU sections of gpu.sh side by side, each on GPUs of its own, in one device call (device time
# counts the machine's time, not its GPUs):
#   bash benchmarks/gpu_side_by_side.sh [-t SECONDS] "0:splits" "1:longrows" "2:trainflags" "3:pdl"
# Each argument is GPUS:SECTIONS (GPUS as gpu.sh takes it: "0", "0,1"; SECTIONS one or more of its
# sections); each runs as `GPUS=... bash benchmarks/gpu.sh SECTIONS` under `timeout SECONDS` (default
# 540, inside the device tool's 600), its output in $OUT/side_GPUS.txt, printed when all are done;
# then every file under $OUT goes into $OUT/side_by_side.tgz.
# Variables for the sections (SPLITS_ROUNDS=1, ...) pass through. Rows measured so ran beside other
# jobs on the same host: BENCHMARKS.md says so where it cites them.
limit=540
if [ "$1" = "-t" ]; then limit=$2; shift 2; fi
bash benchmarks/gpu.sh env  # the wheels installed once, before the sections start together
for spec in "$@"; do
  gpus=${spec%%:*}; sections=${spec#*:}
  GPUS=$gpus timeout "$limit" bash benchmarks/gpu.sh $sections > "$OUT/side_${gpus}.txt" 2>&1 &
done
wait
for spec in "$@"; do
  echo "### GPUs ${spec%%:*}: ${spec#*:}"
  cat "$OUT/side_${spec%%:*}.txt"
done
# The device tool brings back at most 8 files from $OUT: everything goes back as one archive.
tar czf /tmp/side_by_side.tgz -C "$OUT" . && find "$OUT" -mindepth 1 -delete && mv /tmp/side_by_side.tgz "$OUT/"
