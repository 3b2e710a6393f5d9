"""Where device time goes, from a jax.profiler trace: GPU kernel time by HLO op and by kind.

  python benchmarks/profile_summary.py DIR [--top 25] [--device N]

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


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("dir")
  parser.add_argument("--top", type=int, default=25)
  parser.add_argument("--device", type=int, default=None, help="one GPU's kernels only (default: all)")
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
  for op, v in by_op.most_common(args.top):
    print(f"  {op[:70]:70s} {v / 1e6:9.2f} ms x{count[op]}")


if __name__ == "__main__":
  main()
