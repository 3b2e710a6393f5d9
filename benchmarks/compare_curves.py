"""Loss curves of several training runs side by side: is a change (bfloat16 Adam moments, say)
within the noise that a different seed makes?

  python benchmarks/compare_curves.py A/metrics.jsonl B/metrics.jsonl ... [--window 100]

Each file is a run's metrics.jsonl (`llama_jax.train.metrics`), named by its file name or its
folder. Prints, for every window of steps, each run's mean train/loss; each run's eval/loss rows;
and the largest gap between any two runs' window means. Runs named `<variant>_<seed>` are also
compared by variant: the gap between variants at the same seed beside the gap between seeds of
the same variant (the noise).
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os


def read(path: str) -> tuple[dict[int, float], dict[int, float]]:
  """({step: train/loss}, {step: eval/loss}) of one metrics.jsonl."""
  train, evaluation = {}, {}
  with open(path) as f:
    for line in f:
      row = json.loads(line)
      if "train/loss" in row:
        train[row["step"]] = row["train/loss"]
      if "eval/loss" in row:
        evaluation[row["step"]] = row["eval/loss"]
  return train, evaluation


def name_of(path: str) -> str:
  base = os.path.basename(path)
  return os.path.basename(os.path.dirname(path)) if base == "metrics.jsonl" else base.removesuffix(".jsonl")


def window_means(train: dict[int, float], window: int) -> dict[int, float]:
  """{last step of the window: mean train/loss over its logged steps}."""
  groups = collections.defaultdict(list)
  for step, loss in train.items():
    groups[(step - 1) // window].append(loss)
  return {(k + 1) * window: sum(v) / len(v) for k, v in sorted(groups.items())}


def largest_gap(a: dict[int, float], b: dict[int, float]) -> float:
  shared = a.keys() & b.keys()
  return max(abs(a[k] - b[k]) for k in shared) if shared else float("nan")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("files", nargs="+")
  parser.add_argument("--window", type=int, default=100, help="steps per train/loss mean")
  args = parser.parse_args()
  runs = {name_of(p): read(p) for p in args.files}
  means = {name: window_means(train, args.window) for name, (train, _) in runs.items()}
  names = list(runs)

  print("train/loss, mean over each window of steps")
  print("step".rjust(6) + "".join(n.rjust(18) for n in names))
  for step in sorted(set().union(*means.values())):
    print(str(step).rjust(6) + "".join(
        (f"{means[n][step]:.4f}" if step in means[n] else "-").rjust(18) for n in names))
  print("\neval/loss")
  for step in sorted(set().union(*(e.keys() for _, e in runs.values()))):
    print(str(step).rjust(6) + "".join(
        (f"{runs[n][1][step]:.4f}" if step in runs[n][1] else "-").rjust(18) for n in names))

  print("\nlargest gap between window means")
  for a, b in itertools.combinations(names, 2):
    print(f"  {a} vs {b}: {largest_gap(means[a], means[b]):.4f}")
  # <variant>_<seed>: the gap a variant makes at a fixed seed against the gap a seed makes.
  split = {n: n.rsplit("_", 1) for n in names if "_" in n}
  same_seed = [(a, b) for a, b in itertools.combinations(split, 2)
               if split[a][1] == split[b][1] and split[a][0] != split[b][0]]
  same_variant = [(a, b) for a, b in itertools.combinations(split, 2)
                  if split[a][0] == split[b][0] and split[a][1] != split[b][1]]
  if same_seed and same_variant:
    variant_gap = max(largest_gap(means[a], means[b]) for a, b in same_seed)
    seed_gap = max(largest_gap(means[a], means[b]) for a, b in same_variant)
    print(f"\nbetween variants at one seed: {variant_gap:.4f}; between seeds of one variant: {seed_gap:.4f}")
    print(json.dumps({"variant_gap": round(variant_gap, 4), "seed_gap": round(seed_gap, 4)}))


if __name__ == "__main__":
  main()
