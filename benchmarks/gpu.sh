# Every GPU table of BENCHMARKS.md, by section: bash benchmarks/gpu.sh SECTION [SECTION ...]
#   env        the card, the driver, the package versions
#   train      training throughput, TinyLlama-1.1B shape, batch 8 x 2048 (+ variants), and the
#              PyTorch reference (transformers eager) in the same call
#   decode     decode tokens/s at batch 1 and 16 (prompt 128 + 256 new tokens), prefill of 2048
#   kernels    the fused decode blocks (Pallas) against XLA's at batch 1: agreement (also with float32,
#              benchmarks/decode_kernels_check.py), decode with each, batch 16, a trace
#   bigdecode  batch-1 decode on the LLaMA-2-7B shape with XLA's blocks and the fused ones
#   qkernels   the fused blocks on quantized weights (int8 per channel, int4 groups of 128) at batch 1:
#              agreement with XLA's quantized blocks and float32 (decode_kernels_check.py --quantize),
#              then decode at bf16/int8/int4 with XLA's blocks and the fused ones, and at batch 16
#   qcheck     the quantized matmul's error against float32 on the dequantized weight, XLA's and the
#              fused kernel's, by scheme, layout and rows (benchmarks/quantized_project_check.py)
#   qsweep     the matrix-vector kernel's settings on int8 and int4 weights at 1 and 16 rows
#              (kernel_sweep.py --quantize), then the batch-1 decode with the best (QS="int4" and
#              QROWS=1 narrow it; QN, QK, QW the grid of outputs, inputs and warps)
#   smallblocks  the matrix-vector kernel at one row with 4-16 outputs a program, then the batch-1
#              decode with XLA's blocks, the fused ones, and the fused ones with the best settings
#   kernelsweep  the fused decode kernels' settings (benchmarks/kernel_sweep.py): the matrix-vector
#              and the attention ones; then decode at batch 1 and 16 with XLA's blocks and the fused
#              ones, and their agreement (with each other and with float32)
#   xlaflags   decode under XLA flag variants (command buffers over the whole loop)
#   reference  transformers' generate (static cache) at batch 1 and 16, same shapes
#   first      time from generate.py's start to its first token, 1.1B checkpoint (benchmarks/first_token.py)
#   profile    kernel-time summaries of a decode and a training step (benchmarks/profile_summary.py)
#   serve      the server's load benchmark (benchmarks/serve_load.py; carries FastAPI's wheels)
#   splits     the attention kernel in stretches of the cache (decode_block.ATTENTION_SPLIT, the default
#              below 64 programs) against one program a row and KV head: batch 1 and 16 at 384 positions
#   longrows   batch 64 with rows reaching 1,024 positions (as the server's) and 384, the default
#              kernels against XLA's blocks with the ragged attention kernel (the server's other
#              choice: decode_attention=pallas), and a kernel summary of each
#   servekernels  the server and the static batch at 64 clients with XLA's decode blocks (and the
#              ragged attention kernel) against the fused kernels' (auto), one process each
#   servesampled  the same at 16 and 64 clients, sampled (temperature 0.8) on both sides
#   serveprofile  the same at 16 and 64 clients with the scheduler's counters and a kernel summary
#              of the server at 64 clients
#   serveengine  the scheduler and engine under 64 in-process clients, no HTTP (benchmarks/serve_engine_load.py)
#   dispatch   a server decode call: time to return against time to finish (benchmarks/serve_dispatch.py),
#              beside the static batch's decode at 64 rows
#   pdl        programmatic dependent launch: the decode's kernels' griddepcontrol instructions (an
#              XLA dump), and batch-1 decode with XLA's PDL flags on (0.11's default) and off
#   hlo        the decode loop's optimized HLO (to count its kernels)
#   ragged     the ragged decode-attention kernel: its tests compiled for the GPU, a server decode
#              call's step cost and tokens beside XLA's, the engine under 64 clients with each
#              (raggedcheck: the tests and the kernel's error only)
#   staticsteps  a server decode call whose loop count XLA knows (a program per call length) against
#              one whose count is data: does the call return before the device is done, and the engine
#              under 64 clients with each
#   pack       prompts packed side by side in prefill rows against one prompt a row, with XLA's and
#              cuDNN's prefill attention: the engine under 64 clients, each prefill shape's time, and
#              the masked attention's error (benchmarks/packed_attention_check.py)
#   prefillcalls  one batched prefill call by shape (benchmarks/prefill_calls.py): dispatch and device
#              time, a trace of each; and a decode call whose loop is a CUDA graph with a known trip count
#   hostsync   which constructs (a data-dependent cond, loops) make a call block the host (host_sync_check.py)
#   asyncdecode  all-greedy decode calls (no branch in the loop: the call returns at once) against the
#              general sampler's, and the engine under 64 clients with them, prompts packed or not
#   loopgraph  the batch-1 and 16 decode (fused blocks) with the loop in the CUDA graph, against the
#              default: speed and the greedy tokens' digest, two rounds
#   graphs     decode and a server decode call with XLA's command buffers (CUDA graphs) taking the
#              whole loop (WHILE, CONDITIONAL), with none, and with the default set
#   fsdp       every GPU of a several-GPU machine: TinyLlama, LLaMA-2-7B and 13B shapes, FSDP
#   bigmodels  LLaMA-2-7B variants (batch, remat policy, XLA's collective scheduling) on every GPU,
#              13B on every GPU, 7B on two of them when the cards hold it (> 100 GB)
#   fourh100   four 80 GB cards (nvidia-h100-x4): LLaMA-2-13B (its config: bfloat16 moments,
#              dots_no_batch) and with full rematerialisation, the 7B step, and a profile of the
#              7B step (GPU 0's kernels, collectives apart); JAX may take 95% of each card
#   attnsave   the 7B step on every GPU with cuDNN attention's forward saved for the backward
#              (remat dots_and_attention), with XLA's Triton GEMMs off, its profile; and 13B with
#              JAX's pool cut to what 95% of an 80 GB H100 gives (on cards of > 100 GB)
#   bigconfigs the 7B and 13B configs as they are (7B dots_and_attention, 13B dots_no_batch): 13B in an 80 GB
#              card's pool (cards of > 100 GB), 7B on two of the GPUs; and the 7B shape cut to 8
#              layers on one GPU beside the same on every GPU (what the collectives cost a GPU)
#   trainknobs the TinyLlama training step under cheap knobs, one process each: bfloat16 Adam
#              moments, 12 and 16 sequences a step, XLA's latency-hiding scheduler (TRAINKNOBS_ALL=1:
#              and 16 or 20 sequences with bfloat16 moments)
#   mgpu       a one-row matrix-vector kernel in Pallas Mosaic GPU issuing its weight loads before PDL's
#              wait, alone and chained as a decode step's products, against XLA's (mgpu_matvec.py)
#   trainfusions  the TinyLlama step's kernels by HLO op, each with what it computes (shape, the operations
#              of its fusion) from an XLA dump of the same run (profile_summary.py --hlo)
#   fusionflags  the TinyLlama step at 32 sequences with bfloat16 moments (53.8%, the best batch) under
#              XLA's experimental fusion flags: Triton kernels for normalisations (softmax priority
#              fusion), the block-level rewriter, multi-output Triton fusions, and the three together
#   trainbatch the TinyLlama step with bfloat16 moments at 24 and 32 sequences
#   trainflags the TinyLlama step at 16 sequences with bfloat16 moments under XLA flags for its GEMMs
#              (cuBLASLt, no Triton GEMMs)
#   unrolled   LLaMA-2-7B on every GPU with its 32 blocks unrolled (model.scan_layers=False; TinyLlama
#              gained 30% unrolled; the 7B config's choice since session 13) beside scanned blocks, at
#              4 and (cards of > 100 GB) 6 sequences a GPU (UNROLLED_SEQS); 13B unrolled at 2
#              sequences a GPU (4 GPUs or more)
#   unrolled13 LLaMA-2-13B's config unrolled against scanned, 2 sequences a GPU, every GPU
#   batchdecode  batch 16 and 64 with the decode layout (output-major) against the model's (--nofuse),
#              and a kernel summary of the batch-16 decode in each (BD_PROFILE_ONLY=1: the summaries only)
#   batchattention  batch 16 and 64: XLA's matmuls around the fused attention kernel (the default on one
#              GPU, decode_block.batch_block) against XLA's blocks (BA_NOFUSE=1: also on the model's
#              layout, --nofuse); a kernel summary of the batch-16 decode with the kernels
#   batchkernels  batch 16: the batch blocks' agreement with XLA's and float32 (decode_kernels_check.py),
#              which products to run as matvec kernels beside the fused attention
#              (benchmarks/decode_variants.py, a process a run, rounds over the variants; then one
#              round sharing XLA's autotuned picks), and the attention kernel's settings at 16 rows
#   layoutbatch  at 16 and 64 rows, the block products with input-major weights, output-major, and
#              output-major with the operands swapped (benchmarks/quantized_matmul.py), also with
#              cuBLAS for every GEMM; then batch-16 decode in both layouts with and without it
#   decode1    the decode table on the first GPU of a several-GPU machine
#   quantize   decode at bf16 beside weight-only int8 (per channel) and int4 (groups of 128)
#   qmatmul    formulations of the quantized matmul at decode's shapes (benchmarks/quantized_matmul.py)
#   gptq       GPTQ of the whole model, 128 calibration windows of 2048 tokens (as the paper)
#   lora       training steps: full training beside LoRA r=16 on a float base and on an int4 base
#   moments    bfloat16 against float32 Adam moments: the tiny model on the bundled corpus, 1000
#              steps, seeds 0 and 1 of each (benchmarks/compare_curves.py puts the curves side by side)
#   largest    LLaMA-2-7B training steps on one GPU with bfloat16 moments (a card of > 100 GB only)
#   align      DPO steps (policy + frozen reference) and PPO steps (rollout, scoring, updates)
#   headline   the headline rows again at this commit (a regression check): training at the config's
#              batch, decode at batch 1 and 16 (prompt 128 + 256 new tokens), prefill of 2048 tokens;
#              on several GPUs instead, TinyLlama at 8 sequences a GPU and the 7B config as it is
# Results: one JSON line per run in $OUT/<section>.jsonl; the device's stdout has the same lines.
# GPUS=0,1 runs the sections on those GPUs only (CUDA_VISIBLE_DEVICES; "every GPU" then means them), so
# that one-GPU sections can run side by side on the GPUs of a larger machine (not those that pick
# their GPUs themselves: decode1, bigmodels, bigconfigs; nor two that write one workdir or
# $OUT/last.log: the serve* sections, the profiles):
#   bash benchmarks/gpu.sh env; GPUS=0,1 bash benchmarks/gpu.sh unrolled & GPUS=2 bash benchmarks/gpu.sh trainknobs & wait
# (benchmarks/gpu_side_by_side.sh "0,1:unrolled" "2:trainknobs" does that, with a time limit each).
. benchmarks/gpu_setup.sh
T="python3 -m llama_jax.bench train --config configs/tinyllama_1b.py"
D="python3 -m llama_jax.bench decode --config configs/tinyllama_1b.py"
# The 7B config's blocks scanned, as every section but `unrolled` measured them (the config unrolls
# since session 13; unrolled, four 80 GB cards do not hold fourh100's 4 sequences a GPU).
B7="timeout 200 python3 -m llama_jax.bench train --config configs/llama2_7b.py --steps 5 --warmup 2 --config.model.scan_layers=True"
B13="timeout 200 python3 -m llama_jax.bench train --config configs/llama2_13b.py --steps 5 --warmup 2"
N=$(nvidia-smi -L | wc -l)  # GPUs of this machine
if [ -n "$GPUS" ]; then export CUDA_VISIBLE_DEVICES=$GPUS; N=$(echo "$GPUS" | tr ',' '\n' | wc -l); fi
mem=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)  # MiB a card
M="XLA_PYTHON_CLIENT_MEM_FRACTION=0.95"  # 80 GB cards need it for the 7B and 13B configs
# On a card of > 100 GB, JAX's pool cut to what 0.95 of an H100 80GB HBM3 (81,559 MiB) gives: 77,481 MiB
H100POOL="XLA_PYTHON_CLIENT_MEM_FRACTION=$(python3 -c "print(round(0.95 * 81559 / max(${mem:-0}, 1), 4))")"
run() {  # run SECTION ENV... COMMAND...: one benchmark, its last line (JSON) kept
  local section=$1; shift
  echo "== $*"
  env "$@" > $OUT/$section.log 2>&1  # the section's last run's whole log
  tail -1 $OUT/$section.log | tee -a $OUT/$section.jsonl
  grep -E "^E[0-9]|Error|error:" $OUT/$section.log | tail -3
}
for section in "$@"; do case $section in
env)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import jax, flax, optax, orbax.checkpoint as o; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'orbax', o.__version__, jax.devices())" ;;
train)
  run train XLA_FLAGS= $T
  run train XLA_FLAGS= $T --config.optimizer.grad_accum_steps=2 --config.batch_size=16
  run train XLA_FLAGS= $T --config.model.loss_chunk_len=512
  timeout 300 python3 benchmarks/reference_torch.py train 2>&1 | tail -1 | tee -a $OUT/train.jsonl ;;
headline)
  if [ "$N" -gt 1 ]; then
    run headline XLA_FLAGS= $T --config.batch_size=$((8 * N))
    run headline $M XLA_FLAGS= timeout 300 python3 -m llama_jax.bench train --config configs/llama2_7b.py --steps 5 --warmup 2
    continue
  fi
  run headline XLA_FLAGS= $T
  for b in 1 16; do
    run headline XLA_FLAGS= $D --batch_size $b --prompt_len 128 --new_tokens 256
  done
  run headline XLA_FLAGS= $D --batch_size 1 --prompt_len 2048 --new_tokens 1 --repeats 5 ;;
decode)
  for b in 1 16; do
    run decode XLA_FLAGS= $D --batch_size $b --prompt_len 128 --new_tokens 256
    run decode XLA_FLAGS= $D --batch_size $b --prompt_len 128 --new_tokens 256 --nofuse
  done
  run decode XLA_FLAGS= $D --batch_size 1 --prompt_len 2048 --new_tokens 1 --repeats 5 ;;
kernels)  # the fused decode blocks (kernels.decode_block) against XLA's at batch 1: their agreement
  # (with each other and with float32), the decode table with each, batch 16 (XLA's blocks), and a
  # trace of the batch-1 decode with the kernels
  timeout 200 python3 benchmarks/decode_kernels_check.py --rows 1 --checks agreement 2>&1 | grep -E '^\{|Error' | tee -a $OUT/kernels.jsonl
  for k in xla pallas; do
    run kernels XLA_FLAGS= $D --batch_size 1 --prompt_len 128 --new_tokens 256 --config.model.decode_kernels=$k
  done
  run kernels XLA_FLAGS= $D --batch_size 16 --prompt_len 128 --new_tokens 256
  $D --batch_size 1 --prompt_len 128 --new_tokens 256 --repeats 2 --profile_dir /tmp/pk > $OUT/last.log 2>&1; tail -1 $OUT/last.log
  python3 benchmarks/profile_summary.py /tmp/pk --top 16 2>&1 | grep -v Deprecation | tee $OUT/profile_kernels.txt ;;
bigdecode)  # the fused blocks on the LLaMA-2-7B shape at batch 1 (w2's 11,008 inputs: Triton's dot
  # form), beside XLA's, one process each; bf16 and int4 (groups of 128)
  for q in none int4; do
    for k in xla pallas; do
      run bigdecode $M XLA_FLAGS= python3 -m llama_jax.bench decode --config configs/llama2_7b.py --batch_size 1 \
        --prompt_len 128 --new_tokens 256 --config.model.decode_kernels=$k --quantize=${q/none/}
    done
  done ;;
qkernels)  # QK_DECODES=0: the agreement checks only
  for q in int8 int4; do
    timeout 200 python3 benchmarks/decode_kernels_check.py --rows 1 --checks agreement --quantize $q 2>&1 \
      | grep -E '^\{|Error' | tee -a $OUT/qkernels.jsonl
  done
  for q in $([ "$QK_DECODES" = 0 ] || echo none int8 int4); do  # none: bf16
    for k in xla pallas; do
      run qkernels XLA_FLAGS= $D --batch_size 1 --prompt_len 128 --new_tokens 256 --quantize=${q/none/} \
        --config.model.decode_kernels=$k
    done
    run qkernels XLA_FLAGS= $D --batch_size 16 --prompt_len 128 --new_tokens 256 --quantize=${q/none/}
  done ;;
qcheck)
  timeout 200 python3 benchmarks/quantized_project_check.py 2>&1 | grep -E '^\{|Error' | tee -a $OUT/qcheck.jsonl ;;
qsweep)  # QS: which weights (default "int8 int4"), QROWS: batch rows (default 1,16); QN, QK, QW: the grid
  for q in ${QS:-int8 int4}; do
    timeout 280 python3 benchmarks/kernel_sweep.py --rows ${QROWS:-1,16} --quantize $q --block_n ${QN:-4,8,16} \
      --block_k ${QK:-256,512,1024} --warps ${QW:-4,8} --stages 4 --lengths '' --decode configs/tinyllama_1b.py 2>&1 \
      | grep -E '^\{|Error' | tee -a $OUT/qsweep.jsonl | grep -v '^{"product": "w'
  done ;;
smallblocks)  # one row: fewer outputs a program (more programs in flight), summed each step or at the
  # end (wide), then decode with the best
  timeout 250 python3 benchmarks/kernel_sweep.py --rows 1 --block_n 4,8 --block_k 512,1024,2048 --warps 4,8 \
    --stages 4 --lengths '' --decode configs/tinyllama_1b.py 2>&1 | grep -E '^\{|Error' \
    | tee -a $OUT/smallblocks.jsonl | grep -v '^{"product": "w' ;;
kernelsweep)  # the fused decode kernels by tile, warps and stages, at 1 and 16 rows; then decode with them
  timeout 300 python3 benchmarks/kernel_sweep.py --rows 1,16 --stages 4 2>&1 | grep -E '^\{|Error' \
    | tee -a $OUT/kernelsweep.jsonl | grep -v '^{"product": "w'  # every setting in the file, the best shown
  for b in 1 16; do
    for k in xla pallas; do
      run kernelsweep XLA_FLAGS= $D --batch_size $b --prompt_len 128 --new_tokens 256 --config.model.decode_kernels=$k
    done
  done
  timeout 200 python3 benchmarks/decode_kernels_check.py --rows 1 --checks agreement 2>&1 | grep -E '^\{|Error' | tee -a $OUT/kernelsweep.jsonl ;;
xlaflags)  # decode's matrix-vector products: XLA rewrites a dot with one row into multiply + reduce
  for f in "--xla_gpu_enable_dot_strength_reduction=false" "--xla_gpu_enable_triton_gemm=false" \
           "--xla_gpu_enable_dot_strength_reduction=false --xla_gpu_enable_triton_gemm=false"; do
    run xlaflags XLA_FLAGS="$f" $D --batch_size 1 --prompt_len 128 --new_tokens 256
    run xlaflags XLA_FLAGS="$f" $D --batch_size 16 --prompt_len 128 --new_tokens 256
  done ;;
reference)
  for b in 1 16; do
    timeout 200 python3 benchmarks/reference_torch.py decode --batch_size $b --cache static 2>&1 | tail -1 | tee -a $OUT/reference.jsonl
  done ;;
first)
  python3 benchmarks/first_token.py --config configs/tinyllama_1b.py --workdir /tmp/first_token 2>&1 | tee -a $OUT/first.jsonl ;;
profile)  # the timed region only: compilation and autotuning stay out of the trace
  $D --batch_size 1 --prompt_len 128 --new_tokens 256 --repeats 2 --profile_dir /tmp/pd > $OUT/last.log 2>&1; tail -1 $OUT/last.log
  python3 benchmarks/profile_summary.py /tmp/pd --top 30 2>&1 | grep -v Deprecation | tee $OUT/profile_decode.txt
  $T --steps 3 --warmup 2 --profile_dir /tmp/pt > $OUT/last.log 2>&1; tail -1 $OUT/last.log
  python3 benchmarks/profile_summary.py /tmp/pt --top 40 2>&1 | grep -v Deprecation | tee $OUT/profile_train.txt ;;
fsdp)  # every GPU of the machine (2 or 4): TinyLlama, then the LLaMA-2 7B and 13B shapes, FSDP
  S="--steps 5 --warmup 2"
  run fsdp XLA_FLAGS= $T --config.batch_size=$((8 * N))
  run fsdp $M XLA_FLAGS= python3 -m llama_jax.bench train --config configs/llama2_7b.py $S --config.batch_size=$((4 * N)) \
    --config.model.scan_layers=True  # as its recorded rows ran (before session 13)
  run fsdp $M XLA_FLAGS= python3 -m llama_jax.bench train --config configs/llama2_13b.py $S --config.batch_size=$((2 * N)) --config.model.remat_policy=full ;;
bigmodels)  # where the 7B step's time goes on several GPUs: what is rematerialised, collective overlap
  LHS="--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_pipelined_all_gather=true --xla_gpu_enable_pipelined_reduce_scatter=true --xla_gpu_enable_while_loop_double_buffering=true"
  run bigmodels XLA_FLAGS= $B7 --config.batch_size=$((4 * N))
  run bigmodels XLA_FLAGS= $B7 --config.batch_size=$((2 * N)) --config.model.remat_policy=none
  run bigmodels XLA_FLAGS="$LHS" $B7 --config.batch_size=$((4 * N))
  run bigmodels XLA_FLAGS= $B13 --config.batch_size=$((2 * N)) --config.model.remat_policy=full
  if [ "$mem" -gt 100000 ]; then
    run bigmodels CUDA_VISIBLE_DEVICES=0,1 XLA_FLAGS= $B7 --config.batch_size=4 --config.model.remat_policy=none
  fi ;;
bigbatch)  # the 7B and 13B steps with more sequences a GPU (cards of > 100 GB) and the projections saved
  run bigbatch XLA_FLAGS= $B7 --config.batch_size=$((8 * N))
  run bigbatch XLA_FLAGS= $B7 --config.batch_size=$((6 * N))
  run bigbatch XLA_FLAGS= $B7 --config.batch_size=$((4 * N)) --config.model.remat_policy=save_matmuls
  run bigbatch XLA_FLAGS= $B13 --config.batch_size=$((2 * N))
  run bigbatch XLA_FLAGS= $B13 --config.batch_size=$((4 * N)) ;;
fourh100)  # 13B and 7B on four 80 GB cards; JAX's default share of a card (75%) would not hold them
  run fourh100 $M XLA_FLAGS= $B13 --config.batch_size=$((2 * N))
  run fourh100 $M XLA_FLAGS= $B13 --config.batch_size=$((2 * N)) --config.model.remat_policy=full
  run fourh100 $M XLA_FLAGS= $B7 --config.batch_size=$((4 * N))
  run fourh100 $M XLA_FLAGS= $B7 --config.batch_size=$((4 * N)) --steps 3 --profile_dir /tmp/p7
  python3 benchmarks/profile_summary.py /tmp/p7 --top 40 --device 0 2>&1 | grep -v Deprecation | tee $OUT/profile_7b.txt ;;
attnsave)
  run attnsave $M XLA_FLAGS= $B7 --config.batch_size=$((4 * N)) --config.model.remat_policy=dots_and_attention
  run attnsave $M XLA_FLAGS= $B7 --config.batch_size=$((6 * N)) --config.model.remat_policy=dots_and_attention
  run attnsave $M XLA_FLAGS=--xla_gpu_enable_triton_gemm=false $B7 --config.batch_size=$((4 * N))
  if [ "$mem" -gt 100000 ]; then
    run attnsave $H100POOL XLA_FLAGS= $B13 --config.batch_size=$((2 * N))
  fi
  run attnsave $M XLA_FLAGS= $B7 --config.batch_size=$((4 * N)) --config.model.remat_policy=dots_and_attention \
    --steps 3 --profile_dir /tmp/p7a
  python3 benchmarks/profile_summary.py /tmp/p7a --top 30 --device 0 2>&1 | grep -v Deprecation | tee $OUT/profile_7b_attn.txt ;;
bigconfigs)
  if [ "$mem" -gt 100000 ]; then
    run bigconfigs $H100POOL XLA_FLAGS= $B13 --config.batch_size=$((2 * N))
    run bigconfigs CUDA_VISIBLE_DEVICES=0,1 XLA_FLAGS= $B7 --config.batch_size=8
  fi
  run bigconfigs CUDA_VISIBLE_DEVICES=0 $M XLA_FLAGS= $B7 --config.batch_size=4 --config.model.n_layers=8
  run bigconfigs $M XLA_FLAGS= $B7 --config.batch_size=$((4 * N)) --config.model.n_layers=8 ;;
batchdecode)
  for b in $([ -n "$BD_PROFILE_ONLY" ] || echo 16 64); do
    run batchdecode XLA_FLAGS= $D --batch_size $b --prompt_len 128 --new_tokens 256
    run batchdecode XLA_FLAGS= $D --batch_size $b --prompt_len 128 --new_tokens 256 --nofuse
  done
  for layout in "" --nofuse; do
    rm -rf /tmp/pb
    $D --batch_size 16 --prompt_len 128 --new_tokens 256 --repeats 2 --profile_dir /tmp/pb $layout > $OUT/last.log 2>&1
    tail -1 $OUT/last.log
    python3 benchmarks/profile_summary.py /tmp/pb --top 30 2>&1 | grep -v Deprecation | tee $OUT/profile_batch16$layout.txt
  done ;;
trainknobs)
  run trainknobs $M XLA_FLAGS= $T
  run trainknobs $M XLA_FLAGS= $T --config.optimizer.moments_dtype=bfloat16
  run trainknobs $M XLA_FLAGS= $T --config.batch_size=12
  run trainknobs $M XLA_FLAGS= $T --config.batch_size=16
  run trainknobs $M XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true $T
  [ -n "$TRAINKNOBS_ALL" ] || continue  # the combinations (session 13's third call ran these three)
  run trainknobs $M XLA_FLAGS= $T --config.batch_size=16 --config.optimizer.moments_dtype=bfloat16
  run trainknobs $M XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true $T --config.batch_size=16 \
    --config.optimizer.moments_dtype=bfloat16
  run trainknobs $M XLA_FLAGS= $T --config.batch_size=20 --config.optimizer.moments_dtype=bfloat16 ;;
trainflags)  # the TinyLlama step (16 sequences, bfloat16 moments: the best knobs so far) under XLA flags
  # that change its GEMMs: cuBLASLt, cuBLAS for every GEMM (TRAINFLAGS: others, space-separated;
  # --xla_gpu_exhaustive_tiling_search=true compiled for more than 400 s on an H200 and was dropped)
  K="--config.batch_size=16 --config.optimizer.moments_dtype=bfloat16"
  for f in "" ${TRAINFLAGS:---xla_gpu_enable_cublaslt=true --xla_gpu_enable_triton_gemm=false}; do
    run trainflags $M XLA_FLAGS="$f" $T $K
  done ;;
unrolled)  # UNROLLED_SEQS: sequences a GPU (default 4, and 6 on cards of > 100 GB); 13B only on >= 4 GPUs
  U7="timeout ${UNROLLED_TIMEOUT:-480} python3 -m llama_jax.bench train --config configs/llama2_7b.py --steps 5 --warmup 2"
  U13="timeout ${UNROLLED_TIMEOUT:-480} python3 -m llama_jax.bench train --config configs/llama2_13b.py --steps 5 --warmup 2"
  for s in ${UNROLLED_SEQS:-4 $([ "$mem" -gt 100000 ] && echo 6)}; do
    run unrolled $M XLA_FLAGS= $U7 --config.batch_size=$((s * N)) --config.model.scan_layers=False
    run unrolled $M XLA_FLAGS= $B7 --config.batch_size=$((s * N))
  done
  [ "$N" -ge 4 ] && run unrolled $M XLA_FLAGS= $U13 --config.batch_size=$((2 * N)) --config.model.scan_layers=False ;;
unrolled13)  # LLaMA-2-13B (its config: dots_no_batch, bfloat16 moments) unrolled against scanned on
  # every GPU (four 80 GB cards hold it: 2 sequences a GPU)
  for scan in False True; do
    run unrolled13 $M XLA_FLAGS= timeout ${UNROLLED_TIMEOUT:-480} python3 -m llama_jax.bench train \
      --config configs/llama2_13b.py --steps 5 --warmup 2 --config.batch_size=$((2 * N)) --config.model.scan_layers=$scan
  done ;;
batchattention)
  for b in 16 64; do
    for k in auto xla; do
      run batchattention XLA_FLAGS= $D --batch_size $b --prompt_len 128 --new_tokens 256 --config.model.decode_kernels=$k
    done
    [ -z "$BA_NOFUSE" ] || run batchattention XLA_FLAGS= $D --batch_size $b --prompt_len 128 --new_tokens 256 --nofuse
  done
  for q in $BA_QUANTIZE; do  # e.g. BA_QUANTIZE=int4: batch 16 on quantized weights too
    for k in auto xla; do
      run batchattention XLA_FLAGS= $D --batch_size 16 --prompt_len 128 --new_tokens 256 --quantize=$q --config.model.decode_kernels=$k
    done
  done
  [ "$BA_PROFILE" = 0 ] && continue
  rm -rf /tmp/pa
  $D --batch_size 16 --prompt_len 128 --new_tokens 256 --repeats 2 --profile_dir /tmp/pa > $OUT/last.log 2>&1
  tail -1 $OUT/last.log
  python3 benchmarks/profile_summary.py /tmp/pa --top 30 2>&1 | grep -v Deprecation > $OUT/profile_batchattention.txt ;;
batchkernels)
  timeout 200 python3 benchmarks/decode_kernels_check.py --rows 16 --checks agreement 2>&1 | grep -E '^\{|Error' \
    | tee -a $OUT/batchkernels.jsonl  # the batch blocks against XLA's and float32, teacher-forced
  # BK_VARIANTS: decode_variants.py's variants (default: XLA's blocks, none, wo with w2), BK_ROUNDS
  timeout 450 python3 benchmarks/decode_variants.py --batch_size 16 \
    --variants "${BK_VARIANTS:-xla;BATCH_KERNELS=;BATCH_KERNELS=wo_t,w2_t}" --processes ${BK_ROUNDS:-2} 2>&1 \
    | grep -E '^\{|Error' | tee -a $OUT/batchkernels.jsonl
  timeout 300 python3 benchmarks/decode_variants.py --batch_size 16 --autotune_cache /tmp/autotune_bk \
    --variants "${BK_VARIANTS:-xla;BATCH_KERNELS=;BATCH_KERNELS=wo_t,w2_t}" --processes 1 2>&1 \
    | grep -E '^\{|Error' | tee -a $OUT/batchkernels.jsonl
  timeout 150 python3 benchmarks/kernel_sweep.py --rows 16 --block_n 16 --block_k 256 --warps 4 --stages 4 \
    --attention_blocks 64,128,256 --lengths 384 2>&1 | grep -E '^\{|Error' | tee -a $OUT/batchkernels.jsonl ;;
layoutbatch)
  F=bf16,bf16_transposed,bf16_transposed_swapped
  python3 benchmarks/quantized_matmul.py --rows 1,16,64 --only $F 2>&1 | grep '^{' | tee -a $OUT/layoutbatch.jsonl
  XLA_FLAGS=--xla_gpu_enable_triton_gemm=false python3 benchmarks/quantized_matmul.py --rows 16,64 --only $F 2>&1 \
    | grep '^{' | sed 's/}$/, "xla_flags": "--xla_gpu_enable_triton_gemm=false"}/' | tee -a $OUT/layoutbatch.jsonl
  for f in "" "--xla_gpu_enable_triton_gemm=false"; do
    run layoutbatch XLA_FLAGS="$f" $D --batch_size 16 --prompt_len 128 --new_tokens 256
    run layoutbatch XLA_FLAGS="$f" $D --batch_size 16 --prompt_len 128 --new_tokens 256 --nofuse
  done ;;
decode1)  # decode on the first GPU of a larger machine (its own baseline: fused or not)
  for b in 1 16; do
    run decode1 CUDA_VISIBLE_DEVICES=0 XLA_FLAGS= $D --batch_size $b --prompt_len 128 --new_tokens 256
    run decode1 CUDA_VISIBLE_DEVICES=0 XLA_FLAGS= $D --batch_size $b --prompt_len 128 --new_tokens 256 --nofuse
  done ;;
splits)  # the attention kernel reading the cache in stretches of 128 positions (decode_block.ATTENTION_SPLIT,
  # the default below 64 programs) against one program a row and KV head: one row and 16, a process
  # each, SPLITS_ROUNDS rounds
  for b in 1 16; do
    timeout 250 python3 benchmarks/decode_variants.py --batch_size $b --processes ${SPLITS_ROUNDS:-2} \
      --variants "ATTENTION_SPLIT=0;ATTENTION_SPLIT=128" 2>&1 | grep -E '^\{|Error' | tee -a $OUT/splits.jsonl
  done ;;
mgpu)  # a one-row matrix-vector product as a Pallas Mosaic GPU kernel that loads its weights before
  # waiting for the previous kernel (programmatic dependent launch): alone and chained as a decode
  # step's products, against XLA's (benchmarks/mgpu_matvec.py), with XLA's PDL flags on and off
  for f in "" "--xla_gpu_enable_pdl=false --xla_gpu_enable_pdl_launch=false"; do
    XLA_FLAGS="$f" timeout 250 python3 benchmarks/mgpu_matvec.py --check 2>&1 | grep -E '^\{|Error' \
      | sed "s|}\$|, \"xla_flags\": \"$f\"}|" | tee -a $OUT/mgpu.jsonl
  done ;;
trainfusions)  # which fusions hold the step's elementwise time: the trace's top ops, named by the dump
  XLA_FLAGS="--xla_dump_to=/tmp/tdump" $T --steps 3 --warmup 2 --profile_dir /tmp/tf > $OUT/last.log 2>&1; tail -1 $OUT/last.log
  python3 benchmarks/profile_summary.py /tmp/tf --top 70 --hlo /tmp/tdump 2>&1 | grep -v Deprecation | tee $OUT/profile_trainfusions.txt
  tar czf $OUT/train_step_hlo.tgz -C /tmp/tdump $(cd /tmp/tdump && ls *after_optimizations.txt) ;;
fusionflags)  # can XLA's Triton fusions take the norms' and SwiGLU's passes (session 15's profile)?
  for f in "" --xla_gpu_experimental_enable_triton_softmax_priority_fusion=true \
      --xla_gpu_experimental_enable_fusion_block_level_rewriter=true \
      --xla_gpu_unsupported_enable_triton_multi_output_fusion=true \
      "--xla_gpu_experimental_enable_triton_softmax_priority_fusion=true --xla_gpu_experimental_enable_fusion_block_level_rewriter=true --xla_gpu_unsupported_enable_triton_multi_output_fusion=true"; do
    env $M XLA_FLAGS="$f" timeout 110 $T --steps 6 --warmup 2 --config.batch_size=32 \
      --config.optimizer.moments_dtype=bfloat16 > $OUT/last.log 2>&1
    { tail -1 $OUT/last.log | grep '^{' || grep -E "Error|error" $OUT/last.log | tail -1 | sed 's/"//g; s/.*/{"error": "&"}/'; } \
      | sed "s|}\$|, \"xla_flags\": \"$f\"}|" | tee -a $OUT/fusionflags.jsonl
  done ;;
trainbatch)  # the TinyLlama step with bfloat16 moments at 24 and 32 sequences (where 8-20 saturate)
  for b in 24 32; do
    run trainbatch $M XLA_FLAGS= $T --config.batch_size=$b --config.optimizer.moments_dtype=bfloat16
  done ;;
longrows)  # the server's question offline: 64 rows of 768 + 256 tokens (its rows reach 1,024) and of
  # 128 + 256, with the default kernels (the fused attention, one program a row and KV head) and XLA's
  # blocks with the ragged split attention; then a kernel summary of the long rows with each
  for p in 768 128; do
    for k in "auto" "xla --config.model.decode_attention=pallas"; do
      run longrows XLA_FLAGS= $D --batch_size 64 --prompt_len $p --new_tokens 256 --config.model.decode_kernels=$k
    done
  done
  [ "$LONGROWS_PROFILE" = 0 ] && continue
  for k in "auto" "xla --config.model.decode_attention=pallas"; do
    rm -rf /tmp/pl
    $D --batch_size 64 --prompt_len 768 --new_tokens 256 --repeats 2 --profile_dir /tmp/pl \
      --config.model.decode_kernels=$k > $OUT/longrows.log 2>&1
    python3 benchmarks/profile_summary.py /tmp/pl --top 20 2>&1 | grep -v Deprecation > $OUT/profile_longrows_${k%% *}.txt
  done ;;
servekernels)
  for k in xla auto; do
    python3 benchmarks/serve_load.py --workdir /tmp/serve_load --attention_impl cudnn --clients 64 \
      --decode_kernels $k 2>&1 | tee $OUT/servekernels_$k.txt | tail -3
  done ;;
serve)  # the OpenAI-compatible server under 1, 16 and 64 streaming clients beside static batches
  python3 benchmarks/serve_load.py --workdir /tmp/serve_load --attention_impl cudnn 2>&1 | tee $OUT/serve_load.txt | tail -12 ;;
servesampled)  # the same at 16 and 64 clients with sampled answers (temperature 0.8, both sides): the
  # decode calls hold the host (the sampler's branch in the loop)
  python3 benchmarks/serve_load.py --workdir /tmp/serve_load --attention_impl cudnn --temperature 0.8 \
    --clients 16,64 2>&1 | tee $OUT/serve_sampled.txt | tail -12 ;;
serveprofile)  # 16 and 64 clients, the scheduler's counters, and a trace of the server at 64 clients
  python3 benchmarks/serve_load.py --workdir /tmp/serve_load --clients 16,64 --profile_dir /tmp/sp 2>&1 \
    | tee $OUT/serve_load.txt | tail -16
  python3 benchmarks/profile_summary.py /tmp/sp --top 30 2>&1 | grep -v Deprecation | tee $OUT/profile_serve.txt | head -40 ;;
serveengine)  # the scheduler and engine without HTTP, 64 closed-loop clients, beside the static batch
  python3 benchmarks/serve_engine_load.py 2>&1 | grep '^{' | tee -a $OUT/serve_engine.jsonl ;;
dispatch)  # whether a server decode call returns before the device is done; ms/step by window at 64 rows
  python3 benchmarks/serve_dispatch.py 2>&1 | grep '^{' | tee -a $OUT/dispatch.jsonl
  run dispatch XLA_FLAGS= $D --batch_size 64 --prompt_len 227 --new_tokens 185 --repeats 3 ;;
ragged|raggedcheck)  # decode attention reading each slot's own length (Pallas) against XLA's over
  # the window; raggedcheck: the kernel's tests and its error at serving shapes only
  python3 -m pytest -q -p no:cacheprovider -W ignore tests/test_decode_attention.py -k "not slot_engine" 2>&1 | tail -3
  python3 benchmarks/decode_attention_check.py 2>&1 | grep '^{' | tee -a $OUT/ragged.jsonl
  [ "$section" = raggedcheck ] && continue
  python3 benchmarks/serve_dispatch.py --decode_attention xla,pallas 2>&1 | grep '^{' | tee -a $OUT/ragged.jsonl
  python3 benchmarks/serve_engine_load.py --modes device_thread --decode_attention xla,pallas 2>&1 \
    | grep '^{' | tee -a $OUT/ragged.jsonl ;;
staticsteps)  # the decode call's trip count compiled in (call_lengths) or data
  python3 benchmarks/serve_dispatch.py --steps 32 --static_steps 1,0 2>&1 | grep '^{' | tee -a $OUT/staticsteps.jsonl
  python3 benchmarks/serve_engine_load.py --modes device_thread --static_steps 1,0 2>&1 \
    | grep '^{' | tee -a $OUT/staticsteps.jsonl ;;
pack)  # prompts packed side by side in prefill rows (a segment mask) against one prompt a row
  python3 benchmarks/packed_attention_check.py 2>&1 | grep '^{' | tee -a $OUT/pack.jsonl
  python3 benchmarks/serve_engine_load.py --modes device_thread --attention_impl cudnn,xla --pack_prompts 1,0 \
    --time_prefill 2>&1 | grep '^{' | tee -a $OUT/pack.jsonl ;;
prefillcalls)  # one batched prefill call by shape: host dispatch, ready, back to back, and a trace of each
  python3 benchmarks/prefill_calls.py --profile_dir /tmp/pf 2>&1 | grep '^{' | tee -a $OUT/prefill_calls.jsonl
  for d in /tmp/pf/*; do
    echo "== $d"; python3 benchmarks/profile_summary.py $d --top 12 2>&1 | grep -v Deprecation | tee $OUT/profile_$(basename $d).txt
  done
  # a decode call with a known trip count and the loop inside a CUDA graph: does it return at once?
  XLA_FLAGS="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL --xla_gpu_graph_min_graph_size=1" \
    python3 benchmarks/serve_dispatch.py --steps 32 --windows 512 2>&1 | grep '^{' | tee -a $OUT/prefill_calls.jsonl ;;
hostsync)  # which constructs make a jitted call block the host until the device is done
  for f in "" "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL --xla_gpu_graph_min_graph_size=1"; do
    echo "== XLA_FLAGS=$f"; XLA_FLAGS="$f" python3 benchmarks/host_sync_check.py 2>&1 | grep '^{' | tee -a $OUT/hostsync.jsonl
  done ;;
asyncdecode)  # an all-greedy decode call (no sampler branches: returns at once) against the general one;
  # then the engine under 64 clients (greedy requests: all-greedy calls) with prompts packed or not
  python3 benchmarks/serve_dispatch.py --steps 32 --windows 512 --greedy 0,1 2>&1 | grep '^{' | tee -a $OUT/asyncdecode.jsonl
  python3 benchmarks/serve_engine_load.py --modes device_thread --attention_impl cudnn --pack_prompts 1,0 2>&1 \
    | grep '^{' | tee -a $OUT/asyncdecode.jsonl ;;
loopgraph)  # the decode loop itself in the CUDA graph (WHILE, CONDITIONAL command buffers) over the
  # fused blocks, batch 1 and 16, two rounds: speed, and the greedy tokens' digest against the default's
  G="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL --xla_gpu_graph_min_graph_size=1"
  for r in 0 1; do for f in "" "$G"; do for b in 1 16; do
    run loopgraph XLA_FLAGS="$f" $D --batch_size $b --prompt_len 128 --new_tokens 256
  done; done; done ;;
graphs)  # a step's kernels launched one by one from the host, or as one CUDA graph per loop
  G="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL --xla_gpu_graph_min_graph_size=1"
  for f in "" "--xla_gpu_enable_command_buffer=" "$G"; do
    for b in 1 64; do
      run graphs XLA_FLAGS="$f" $D --batch_size $b --prompt_len 128 --new_tokens 256
    done
    echo "== XLA_FLAGS=$f serve_dispatch.py"
    XLA_FLAGS="$f" python3 benchmarks/serve_dispatch.py --windows 512 2>&1 | grep '^{' | tee -a $OUT/graphs.jsonl
  done ;;
pdl)  # programmatic dependent launch (XLA 0.11 launches its and Pallas-Triton's kernels with PDL by
  # default, a wait at each kernel's entry): whether the decode's kernels carry griddepcontrol, and the
  # batch-1 decode (fused blocks, then XLA's) with PDL on (the default) and off
  rm -rf /tmp/dpdl
  XLA_FLAGS="--xla_dump_to=/tmp/dpdl --xla_gpu_dump_llvmir" $D --batch_size 1 --prompt_len 128 --new_tokens 32 \
    --repeats 1 > $OUT/pdl.log 2>&1
  echo "files naming griddepcontrol: $(grep -rl griddepcontrol /tmp/dpdl | wc -l) of $(ls /tmp/dpdl | wc -l);" \
    "occurrences: $(grep -ro griddepcontrol[.a-z_]* /tmp/dpdl | sed 's/.*://' | sort | uniq -c | tr '\n' ' ')" \
    | tee $OUT/pdl_dump.txt
  for k in pallas xla; do
    for f in "" "--xla_gpu_enable_pdl=false --xla_gpu_enable_pdl_launch=false"; do
      run pdl XLA_FLAGS="$f" $D --batch_size 1 --prompt_len 128 --new_tokens 256 --config.model.decode_kernels=$k
    done
  done ;;
hlo)  # the optimized HLO of the decode loop, to count its kernels per layer
  XLA_FLAGS="--xla_dump_to=/tmp/dump --xla_dump_hlo_as_text" $D --batch_size 1 --prompt_len 128 --new_tokens 32 --repeats 1 > $OUT/last.log 2>&1
  cp "$(ls -S /tmp/dump/*jit_decode*after_optimizations.txt | head -1)" $OUT/decode_hlo.txt; ls -la $OUT/decode_hlo.txt ;;
quantize)
  for b in 1 16; do
    for q in none int8 int4; do  # none: the bf16 row of the same call
      run quantize XLA_FLAGS= $D --batch_size $b --prompt_len 128 --new_tokens 256 --quantize=${q/none/}
    done
  done ;;
qmatmul)
  python3 benchmarks/quantized_matmul.py 2>&1 | grep '^{' | tee -a $OUT/qmatmul.jsonl
  XLA_FLAGS=--xla_gpu_triton_gemm_any=true python3 benchmarks/quantized_matmul.py --only bf16,int8_current,int8_dequantize_dot,int4_current,int4_dequantize_dot 2>&1 \
    | grep '^{' | sed 's/}$/, "xla_flags": "--xla_gpu_triton_gemm_any=true"}/' | tee -a $OUT/qmatmul.jsonl ;;
gptq)
  run gptq XLA_FLAGS= python3 -m llama_jax.bench quantize --config configs/tinyllama_1b.py --bits 4 --method gptq --group_size 128 --calibration_samples 128 --calibration_len 2048 ;;
lora)
  run lora XLA_FLAGS= $T --steps 10
  run lora XLA_FLAGS= $T --steps 10 --config.lora.rank=16
  run lora XLA_FLAGS= $T --steps 10 --config.lora.rank=16 --config.lora.quantize_base=int4 ;;
moments)
  bash benchmarks/moments.sh $OUT/moments ;;
largest)  # 6.74B x 12 bytes (float32 parameters and gradients, bfloat16 moments) = 81 GB + activations
  if [ "$mem" -lt 100000 ]; then echo "largest: a card of > 100 GB only (this one: $mem MiB)"; continue; fi
  run largest XLA_FLAGS= python3 -m llama_jax.bench train --config configs/llama2_7b.py --warmup 2 --steps 5 \
    --config.optimizer.moments_dtype=bfloat16 --config.batch_size=1 --config.model.remat_policy=full \
    --config.model.scan_layers=True ;;  # as measured (session 8; unrolled blocks take more memory)
align)  # DPO: 8 pairs x 1024 tokens a step; PPO: 64 prompts of 256 tokens, 256 new tokens each
  A="python3 -m llama_jax.bench"
  run align XLA_FLAGS= $A dpo --config configs/dpo_tinyllama_1b.py --warmup 3 --steps 10
  run align XLA_FLAGS= $A dpo --config configs/dpo_tinyllama_1b.py --warmup 3 --steps 10 --config.batch_size=16
  run align XLA_FLAGS= $A ppo --config configs/ppo_tinyllama_1b.py --steps 3 ;;
*) echo "unknown section $section" ;;
esac; done
