r"""Summary table of many per-category runs, beside the paper's numbers.

  python -m draem_jax.summary --root=workdirs/mvtec

Reads ``<root>/<category>/eval/metrics.json`` for every category folder that has one and prints (and writes
to ``<root>/summary.md``) image AUROC, pixel AUROC, pixel AP and AUPRO per category with the paper's values
(REFERENCE.md 7.1) and the means over the categories found.
"""

from __future__ import annotations

import json
import os

from absl import app
from absl import flags

from draem_jax import published

FLAGS = flags.FLAGS


def collect(root: str) -> dict[str, dict]:
  """``{category: metrics}`` of every ``<root>/<category>/eval/metrics.json``, sorted by category."""
  if not os.path.isdir(root):
    raise FileNotFoundError(f"--root={root} is not a folder of per-category work directories.")
  found = {}
  for name in sorted(os.listdir(root)):
    path = os.path.join(root, name, "eval", "metrics.json")
    if os.path.isfile(path):
      with open(path, encoding="utf-8") as f:
        found[name] = json.load(f)
  return found


def table(results: dict[str, dict]) -> str:
  """Markdown table; percent with two decimals; paper values where the category is an MVTec one."""
  def pct(v):
    return "" if v is None else f"{100 * v:.2f}"

  def ref(v):
    return "" if v is None else f"{v:.1f}"

  lines = ["| category | image AUROC | (paper) | pixel AUROC | (paper) | pixel AP | (paper) | AUPRO |",
           "|---|---|---|---|---|---|---|---|"]
  cols = {k: [] for k in ("image_auroc", "pixel_auroc", "pixel_ap", "aupro")}
  paper_cols = [[], [], []]
  for cat, m in results.items():
    paper = published.PAPER.get(cat, (None, None, None))
    for k in cols:
      if m.get(k) is not None:
        cols[k].append(m[k])
    for i, v in enumerate(paper):
      if v is not None:
        paper_cols[i].append(v)
    lines.append(f"| {cat} | {pct(m.get('image_auroc'))} | {ref(paper[0])} | {pct(m.get('pixel_auroc'))} "
                 f"| {ref(paper[1])} | {pct(m.get('pixel_ap'))} | {ref(paper[2])} | {pct(m.get('aupro'))} |")
  if results:
    mean = {k: (sum(v) / len(v) if v else None) for k, v in cols.items()}
    pmean = [sum(v) / len(v) if v else None for v in paper_cols]
    lines.append(f"| **mean ({len(results)})** | {pct(mean['image_auroc'])} | {ref(pmean[0])} | "
                 f"{pct(mean['pixel_auroc'])} | {ref(pmean[1])} | {pct(mean['pixel_ap'])} | {ref(pmean[2])} "
                 f"| {pct(mean['aupro'])} |")
  if set(results) >= set(published.PAPER):
    lines += ["", "Paper means over the 15 MVTec AD categories: %.1f / %.1f / %.1f; released checkpoints: "
              "%.1f / %.1f / %.1f." % (*published.PAPER_MEAN, *published.RELEASED_CHECKPOINTS_MEAN)]
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  try:
    results = collect(FLAGS.root)
  except FileNotFoundError as e:
    raise SystemExit(f"error: {e}") from None
  if not results:
    raise SystemExit(f"error: no <category>/eval/metrics.json under {FLAGS.root}; evaluate runs first.")
  text = table(results)
  with open(os.path.join(FLAGS.root, "summary.md"), "w", encoding="utf-8") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  flags.DEFINE_string("root", None, "Folder holding one work directory per category.")
  flags.mark_flags_as_required(["root"])
  app.run(main)
