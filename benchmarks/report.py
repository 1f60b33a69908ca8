"""The report: number formatting, the one-line JSON summary, Markdown, and BENCHMARKS.md regeneration."""

from __future__ import annotations

import json
import math
from typing import Any


def fmt(v, digits: int = 3) -> str:
  """Significant digits for small numbers, thousands separators for large ones, '-' for None."""
  if v is None:
    return "-"
  if isinstance(v, float):
    if not math.isfinite(v):
      return str(v)
    if v != 0 and abs(v) < 1e-3:
      return f"{v:.{digits}g}"
    return f"{v:.{digits}g}" if abs(v) < 100 else f"{v:,.0f}"
  return str(v)


def ratio_cell(row: dict[str, Any]) -> str:
  if row.get("ratio") is not None:
    return f"**{row['ratio']:.2f}**"
  return f"- ({row.get('ratio_reason', 'not measured')})"


def summary_line(report: dict[str, Any]) -> str:
  """One JSON line with the headline numbers of every section (for logs and CI)."""
  m = report["machine"]
  out: dict[str, Any] = {"device": m["device_kind"], "backend": m["backend"], "threads": m["threads"],
                         "cpu_devices": m["cpu_devices"], "load": m.get("load_average_before")}
  for name, result in report["sections"].items():
    rows = result.get("rows", []) if isinstance(result, dict) else []
    out[name] = [{k: r[k] for k in ("setting", "ratio") if k in r} | {
        "draem_jax_images_per_s": (r.get("draem_jax") or {}).get("images_per_s")} for r in rows]
  return json.dumps(out, default=float)


def markdown(report: dict[str, Any]) -> str:
  """Every section's tables after a header naming the machine, the load and the settings."""
  from benchmarks import sections  # pylint: disable=g-import-not-at-top
  m, a = report["machine"], report["anomalib"]
  v = m["versions"]
  out = [f"Machine: {m['cpu_model']}, {m['cpu_count']} cores; {m['threads']} threads for both sides; "
         f"draem_jax on {m['cpu_devices'] if m['backend'] == 'cpu' else m['num_devices']} "
         f"{m['backend']} device(s) ({m['device_kind']}); XLA_FLAGS `{m['xla_flags'] or '(none)'}`.",
         f"Load average (1, 5, 15 min) before: {m.get('load_average_before')}, after: "
         f"{m.get('load_average_after')}.",
         f"Versions: python {v.get('python')}, jax {v.get('jax')}, flax {v.get('flax')}"
         + (f"; {a['version']}" if a["available"] else f"; anomalib absent ({a['reason']})") + ".",
         f"Config preset `{report['config']['preset']}`, {report['config']['repeats']} timed calls per side "
         f"(interleaved) after {report['config']['warmup']} warm-up calls; medians.", ""]
  for name, result in report["sections"].items():
    out += sections.module(name).markdown(result)
  return "\n".join(out)


GENERATED_BEGIN = "<!-- benchmarks.run: generated tables begin -->"
GENERATED_END = "<!-- benchmarks.run: generated tables end -->"


def update_benchmarks_md(path: str, tables: str) -> None:
  """Replaces the generated block of ``path`` (between the markers) with ``tables``; the rest stays."""
  with open(path, encoding="utf-8") as f:
    text = f.read()
  if GENERATED_BEGIN not in text or GENERATED_END not in text:
    raise ValueError(f"{path}: no '{GENERATED_BEGIN}' ... '{GENERATED_END}' block to regenerate; add the "
                     "two marker lines where the tables go")
  head, rest = text.split(GENERATED_BEGIN, 1)
  _, tail = rest.split(GENERATED_END, 1)
  with open(path, "w", encoding="utf-8") as f:
    f.write(f"{head}{GENERATED_BEGIN}\n{tables}\n{GENERATED_END}{tail}")
