"""The multi-category summary table: values, paper columns and means."""

import json

from draem_jax import summary


def _write(root, cat, **m):
  d = root / cat / "eval"
  d.mkdir(parents=True)
  (d / "metrics.json").write_text(json.dumps(m))


def test_summary_table_and_means(tmp_path):
  _write(tmp_path, "bottle", image_auroc=0.99, pixel_auroc=0.98, pixel_ap=0.8, aupro=0.9)
  _write(tmp_path, "screw", image_auroc=0.91, pixel_auroc=0.96, pixel_ap=0.6, aupro=0.7)
  (tmp_path / "not_a_run").mkdir()
  results = summary.collect(str(tmp_path))
  assert list(results) == ["bottle", "screw"]
  text = summary.table(results)
  assert "| bottle | 99.00 | 99.2 | 98.00 | 99.1 | 80.00 | 86.5 | 90.00 |" in text
  # Means of the runs found and of the paper's values for the same categories.
  assert "| **mean (2)** | 95.00 | 96.6 | 97.00 | 98.3 | 70.00 | 72.3 | 80.00 |" in text
