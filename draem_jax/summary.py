r"""Summary table of many per-category runs, beside the paper's numbers.

  python -m draem_jax.summary --root=workdirs/mvtec [--overwrite]

Reads ``<root>/<category>/eval/metrics.json`` for every category folder that has one and prints (and writes
to ``<root>/summary.md``) image AUROC, pixel AUROC, pixel AP and AUPRO per category with the paper's values
(``published.PAPER``: DRAEM paper, Tables 1 and 2) and the means over the categories found. An existing
``summary.md`` is replaced only with ``--overwrite``. ``root`` may be a local folder or a ``gs://`` URL.
"""

from __future__ import annotations

from absl import app
from absl import flags

from draem_jax import published
from draem_jax import rundir

FLAGS = flags.FLAGS

SUMMARY_FILE = "summary.md"


def collect(root) -> dict[str, dict]:
  """``{category: metrics}`` of every ``<root>/<category>/eval/metrics.json``, sorted by category."""
  base = rundir.path(root)
  if not base.is_dir():
    raise FileNotFoundError(f"--root={root} is not a folder of per-category work directories.")
  found = {}
  for entry in sorted(base.iterdir(), key=lambda p: p.name):
    file = entry / "eval" / "metrics.json"
    if file.is_file():
      found[entry.name] = rundir.read_json(file)
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
  if set(results) >= set(published.CATEGORIES):
    lines += ["", "Paper means over the 15 MVTec AD categories: %.1f / %.1f / %.1f; released checkpoints: "
              "%.1f / %.1f / %.1f." % (*published.PAPER_MEAN, *published.RELEASED_CHECKPOINTS_MEAN)]
  return "\n".join(lines) + "\n"


def write_summary(root, text: str, *, overwrite: bool = False) -> str:
  """Writes ``<root>/summary.md`` (through a temporary file); refuses to replace one unless ``overwrite``.

  Returns:
    The path written.

  Raises:
    FileExistsError: the file exists and ``overwrite`` is False.
  """
  file = rundir.path(root) / SUMMARY_FILE
  if file.exists() and not overwrite:
    raise FileExistsError(f"{file} exists; pass --overwrite to replace it.")
  tmp = file.parent / f".{file.name}.tmp"
  tmp.write_text(text)
  tmp.rename(file) if "://" in str(file) else tmp.replace(file)
  return str(file)


def summarize(root, *, overwrite: bool = False) -> str:
  """Collects the runs under ``root``, writes ``<root>/summary.md`` and returns the table.

  Raises:
    FileNotFoundError: ``root`` is not a folder or holds no evaluated run.
    FileExistsError: ``summary.md`` exists and ``overwrite`` is False (checked before anything is read).
  """
  file = rundir.path(root) / SUMMARY_FILE
  if file.exists() and not overwrite:
    raise FileExistsError(f"{file} exists; pass --overwrite to replace it.")
  results = collect(root)
  if not results:
    raise FileNotFoundError(f"no <category>/eval/metrics.json under {root}; evaluate runs first.")
  text = table(results)
  write_summary(root, text, overwrite=overwrite)
  return text


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    text = summarize(FLAGS.root, overwrite=FLAGS.overwrite)
  except (FileNotFoundError, FileExistsError, ValueError) as e:
    raise SystemExit(f"error: {e}") from None
  print(text)


if __name__ == "__main__":
  flags.DEFINE_string("root", None, "Folder holding one work directory per category (local or gs://).")
  flags.DEFINE_bool("overwrite", False, "Replace an existing <root>/summary.md.")
  flags.mark_flags_as_required(["root"])
  app.run(main)
