"""Where device time goes, from a jax.profiler trace: GPU kernel time by HLO op and by kind.

  python benchmarks/profile_summary.py DIR [--top 25] [--device N] [--hlo DUMP_DIR]

--hlo: an XLA dump of the same program (XLA_FLAGS=--xla_dump_to=DUMP_DIR) names what each top op
computes: its output shape and the operations inside its fusion (from the optimized module that
defines most of the top ops).

Several GPUs: by default every GPU's kernels are summed; `--device 0` keeps the first GPU's only.
Collectives (NCCL) run on streams of their own beside the computation, so their time is listed
apart and a GPU's "busy" share counts the computation's kernels only.
"""

import argparse
import collections
import glob
import re

from jax.profiler import ProfileData


def kind(op: str, kernel: str) -> str:
  """A kernel's kind from its HLO op's name and its own: cuBLAS runs as `custom-call` ops too, so
  the kernel's name decides between a matmul and cuDNN's attention."""
  o, k = op.lower(), kernel.lower()
  both = f"{o} {k}"
  if any(s in both for s in ("nccl", "all-gather", "reduce-scatter", "all-reduce", "all-to-all",
                             "collective-permute")):
    return "collective (NCCL)"
  if any(s in both for s in ("cudnn", "flash", "fmha", "sdpa", "dot_product_attention")):
    return "attention (cuDNN)"
  # cuBLAS's Hopper kernels are "nvjet_*", its matrix-vector ones "gemv*"; XLA's Triton ones "gemm_fusion*"
  if any(s in both for s in ("gemm", "gemv", "nvjet", "xmma", "cutlass", "cublas", "matmul")) or "dot" in o:
    return "matmul"
  if "custom-call" in o or "custom_call" in o:
    return "other custom call"
  if "copy" in both or "transpose" in both:
    return "copy/transpose"
  if "reduce" in both or "scatter" in both or "gather" in both:
    return "reduce/scatter/gather"
  if "fusion" in both or "loop" in both or "input" in both:
    return "elementwise fusion"
  return "other"


def fused_computations(dump_dir: str, names: list[str]) -> tuple[dict, dict]:
  """From the optimized module of an XLA dump that defines most of `names` (the trace's top ops):
  each instruction's text by name, and each computation's instructions by name."""
  best = ({}, {}, -1)
  for path in glob.glob(f"{dump_dir}/*after_optimizations.txt"):
    instructions, computations, current = {}, {}, None
    for line in open(path):
      head = re.match(r"^(?:ENTRY )?%(\S+) .*\{$", line)
      if head:
        current = computations.setdefault(head.group(1), [])
        continue
      body = re.match(r"^\s+(?:ROOT )?%(\S+) = (.*)$", line)
      if body:
        # The trace names an op with "_" where the HLO text has "." (loop_add_fusion.3 -> loop_add_fusion_3).
        instructions[body.group(1).replace(".", "_")] = body.group(2)
        if current is not None:
          current.append(body.group(2))
    found = sum(name.split(" [")[0].replace(".", "_") in instructions for name in names)
    if found > best[2]:
      best = (instructions, computations, found)
  return best[0], best[1]


def describe(op: str, instructions: dict, computations: dict) -> str:
  """`shape: opcode x count, ...` for a fusion, or its instruction's head for anything else."""
  name = op.split(" [")[0].replace(".", "_")
  text = instructions.get(name)
  if text is None:
    return ""
  shape = text.split(" ", 1)[0]
  called = re.search(r"calls=%([\w.\-]+)", text)
  if not called:
    return f"{shape} {text.split(' ', 2)[1].split('(')[0]}"
  opcodes = collections.Counter()
  for inner in computations.get(called.group(1), []):
    opcode = re.match(r"\S+ ([\w\-]+)\(", inner)
    if opcode and opcode.group(1) not in ("parameter", "constant", "bitcast", "get-tuple-element", "tuple"):
      opcodes[opcode.group(1)] += 1
  return f"{shape} " + ", ".join(f"{k}x{v}" if v > 1 else k for k, v in opcodes.most_common(8))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("dir")
  parser.add_argument("--top", type=int, default=25)
  parser.add_argument("--device", type=int, default=None, help="one GPU's kernels only (default: all)")
  parser.add_argument("--hlo", default=None, help="an XLA dump of the program: what each top op computes")
  args = parser.parse_args()
  path = sorted(glob.glob(f"{args.dir}/**/*.xplane.pb", recursive=True))[-1]
  data = ProfileData.from_file(path)
  by_op, by_kind, count = collections.Counter(), collections.Counter(), collections.Counter()
  by_module, module_count = collections.Counter(), collections.Counter()
  first, last = None, None
  computed = 0  # kernel time outside the collectives
  for plane in data.planes:
    if not re.match(r"/device:GPU:\d+", plane.name):
      continue
    if args.device is not None and plane.name != f"/device:GPU:{args.device}":
      continue
    print(f"{plane.name}: lines {[line.name for line in plane.lines]}")
    for line in plane.lines:
      if "module" in line.name.lower():  # one event per program run: which programs take the time
        for ev in line.events:
          name = re.sub(r"\(\d+\)$", "", ev.name)
          by_module[name] += ev.duration_ns
          module_count[name] += 1
      if "xla ops" in line.name.lower() or "module" in line.name.lower() or "step" in line.name.lower():
        continue  # summary lines that repeat the kernels' time
      for ev in line.events:
        stats = dict(ev.stats)
        op = str(stats.get("hlo_op", ev.name))
        if op.startswith("command_buffer"):  # a CUDA graph: its kernels carry their own names
          op = f"{ev.name} [{op}]"
        by_op[op] += ev.duration_ns
        count[op] += 1
        what = kind(op, ev.name)
        by_kind[what] += ev.duration_ns
        if what == "collective (NCCL)":
          continue  # overlaps the computation: not part of the busy span's count
        computed += ev.duration_ns
        first = ev.start_ns if first is None else min(first, ev.start_ns)
        last = ev.start_ns + ev.duration_ns if last is None else max(last, ev.start_ns + ev.duration_ns)
  total = sum(by_kind.values())
  span = (last - first) if first is not None else 0
  print(f"kernel time {total / 1e6:.1f} ms ({computed / 1e6:.1f} ms outside collectives) over a span of "
        f"{span / 1e6:.1f} ms ({100 * computed / max(span, 1):.0f}% busy); {sum(count.values())} kernels")
  for k, v in by_kind.most_common():
    print(f"  {k:28s} {v / 1e6:10.1f} ms {100 * v / total:5.1f}%")
  if by_module:
    print("programs (XLA modules, wall time on the device):")
    for name, v in by_module.most_common(12):
      print(f"  {name[:70]:70s} {v / 1e6:9.1f} ms x{module_count[name]}")
  print(f"top {args.top} ops:")
  top = by_op.most_common(args.top)
  instructions, computations = fused_computations(args.hlo, [op for op, _ in top]) if args.hlo else ({}, {})
  for op, v in top:
    print(f"  {op[:70]:70s} {v / 1e6:9.2f} ms x{count[op]}")
    if args.hlo:
      print(f"      {describe(op, instructions, computations)[:150]}")


if __name__ == "__main__":
  main()
