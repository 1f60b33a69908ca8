"""The multi-category summary table and the published facts it (and the package) relies on."""

import json
import subprocess
import sys

import numpy as np
import pytest

from draem_jax import published
from draem_jax import summary


def _write(root, cat, **m):
  d = root / cat / "eval"
  d.mkdir(parents=True)
  (d / "metrics.json").write_text(json.dumps(m))


def test_published_tables_agree_with_their_published_totals():
  # Independent published aggregates: the MVTec AD paper's 3,629 training images over 15 categories
  # (5 textures, 10 objects) and the DRAEM paper's rounded means; a mistyped entry breaks one of them.
  assert sum(published.TRAIN_IMAGES.values()) == 3629
  assert (len(published.TEXTURES), len(published.OBJECTS)) == (5, 10)
  assert set(published.CATEGORIES) == set(published.TRAIN_IMAGES) == set(published.PAPER)
  means = np.mean([published.PAPER[c] for c in published.CATEGORIES], axis=0)
  np.testing.assert_array_equal(np.round(means, 1), published.PAPER_MEAN)


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
  assert "Paper means over the 15" not in text  # only printed when every category is there


def test_full_table_mentions_the_published_means(tmp_path):
  for cat in published.CATEGORIES:
    _write(tmp_path, cat, image_auroc=0.5, pixel_auroc=0.5, pixel_ap=0.5)
  text = summary.table(summary.collect(tmp_path))
  assert "| **mean (15)** | 50.00 | 98.0 | 50.00 | 97.3 | 50.00 | 68.4 |  |" in text
  assert "98.0 / 97.3 / 68.4; released checkpoints: 98.1 / 97.5 / 68.9" in text


def test_summarize_writes_once_and_refuses_to_replace(tmp_path):
  _write(tmp_path, "bottle", image_auroc=0.99, pixel_auroc=0.98, pixel_ap=0.8)
  text = summary.summarize(tmp_path)
  assert (tmp_path / "summary.md").read_text() == text and "| bottle | 99.00 |" in text
  (tmp_path / "summary.md").write_text("mine")
  with pytest.raises(FileExistsError, match="summary.md exists; pass --overwrite"):
    summary.summarize(tmp_path)
  assert (tmp_path / "summary.md").read_text() == "mine"
  assert summary.summarize(tmp_path, overwrite=True) == (tmp_path / "summary.md").read_text() == text
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no <category>/eval/metrics.json"):
    summary.summarize(tmp_path / "empty")


def test_cli_error_is_one_line(tmp_path):
  _write(tmp_path, "bottle", image_auroc=0.99, pixel_auroc=0.98, pixel_ap=0.8)
  (tmp_path / "summary.md").write_text("mine")
  out = subprocess.run([sys.executable, "-m", "draem_jax.summary", f"--root={tmp_path}"],
                       capture_output=True, text=True, timeout=120)
  assert out.returncode != 0
  assert out.stderr.strip().splitlines() == [f"error: {tmp_path / 'summary.md'} exists; pass --overwrite "
                                             "to replace it."]
  assert (tmp_path / "summary.md").read_text() == "mine"


def test_collect_missing_root(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a folder"):
    summary.collect(tmp_path / "absent")
