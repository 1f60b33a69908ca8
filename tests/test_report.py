"""report.html: curves against scikit-learn, a self-contained page, and every image and plot loading in
headless Chromium (skips, saying so, where Chromium is not installed)."""

import html
import json
import re
import shutil
import subprocess
import types

import numpy as np
import pytest
import sklearn.metrics
from PIL import Image

from draem_jax import evaluate
from draem_jax import metrics as metrics_lib
from draem_jax import recipes
from draem_jax import report


def test_curves_match_sklearn():
  rng = np.random.default_rng(0)
  y = rng.random(300) < 0.3
  s = np.round(rng.random(300) + 0.4 * y, 2)  # ties
  fpr, tpr = report.roc_curve(y, s)
  want_fpr, want_tpr, _ = sklearn.metrics.roc_curve(y, s, drop_intermediate=False)
  np.testing.assert_allclose(fpr, want_fpr)
  np.testing.assert_allclose(tpr, want_tpr)
  recall, precision = report.pr_curve(y, s)
  want_p, want_r, _ = sklearn.metrics.precision_recall_curve(y, s, drop_intermediate=False)
  np.testing.assert_allclose(recall, want_r[:-1][::-1])
  np.testing.assert_allclose(precision, want_p[:-1][::-1])
  thin_fpr, _ = report.roc_curve(y, s, max_points=10)
  assert len(thin_fpr) == 10 and thin_fpr[0] == 0 and thin_fpr[-1] == 1


def _fake_evaluation(tmp_path):
  """A report from made-up maps and scores (no model): 6 good and 8 defective 32x32 images."""
  rng = np.random.default_rng(1)
  n, size = 14, 32
  labels = np.array([0] * 6 + [1] * 8, np.int32)
  defect_types = ["good"] * 6 + ["crack"] * 4 + ["hole"] * 4
  masks = np.zeros((n, size, size), bool)
  for i in range(6, n):
    y, x = rng.integers(4, 24, 2)
    masks[i, y:y + 6, x:x + 6] = True
  maps = np.clip(rng.random((n, size, size)) * 0.5 + 0.45 * masks, 0, 1).astype(np.float32)
  scores = maps.reshape(n, -1).max(1) + rng.normal(0, 0.05, n)
  test = types.SimpleNamespace(images=rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), masks=masks,
                               labels=labels, defect_types=defect_types,
                               filenames=[f"test/{t}/{i:03d}.png" for i, t in enumerate(defect_types)],
                               paths=[f"/data/test/{t}/{i:03d}.png" for i, t in enumerate(defect_types)])
  free = metrics_lib.compute_all(image_labels=labels, image_scores=scores, masks=masks, anomaly_maps=maps)
  th = {"image": float(np.quantile(scores[:6], 0.9)), "pixel": 0.5, "image_fpr": 0.05, "pixel_fpr": 0.005,
        "num_images": 6, "source": "test", "step": 40, "achieved_image_fpr": 0.0}
  results = {"step": 40, "category": "fake", "selected": "last", "num_test_images": n,
             "normal_thresholds": th, "val_pixel_ap": 0.4,
             **{k: v for k, v in free.items() if not k.endswith("_threshold")}}
  results.update(evaluate.decision_metrics("oracle", labels, scores, masks, maps, free["image_threshold"],
                                           free["pixel_threshold"]))
  results.update(evaluate.decision_metrics("normal", labels, scores, masks, maps, th["image"], th["pixel"]))
  both = {"normal": th["image"], "oracle": free["image_threshold"]}
  results["per_defect_type"] = evaluate.per_defect_type(test, maps, scores, both)
  history = [{"step": s, "val_pixel_ap": 0.1 * k, "val_image_auroc": 0.5 + 0.05 * k}
             for k, s in enumerate((10, 20, 30, 40))]
  config = recipes.tiny()
  evaluate.write_report(tmp_path, evaluate._finite_or_none(results), test, maps, scores, history, 4, config)
  return tmp_path / "eval" / "report.html", results


def test_page_is_self_contained_with_every_section(tmp_path):
  page_path, results = _fake_evaluation(tmp_path)
  page = page_path.read_text()
  assert not re.search(r"(src|href)=\"(https?:)?//", page)  # nothing from the network
  for section in ("Threshold-free metrics", "Decisions", "Curves and scores", "Per defect type",
                  "Synthetic validation", "Gallery"):
    assert section in page
  assert "normal-only (held-out good images)" in page and "oracle F1-max (tuned on the test labels)" in page
  alts = re.findall(r'<img alt="([^"]*)"', page)
  for plot in ("image roc", "image pr", "pixel roc", "pixel pr", "histogram", "validation"):
    assert plot in alts
  # Gallery: highest score first, every FP/FN included and marked.
  captions = [html.unescape(c) for c in re.findall(r"<figcaption>([^<]*)</figcaption>", page)]
  scores = [float(c.rsplit("score ", 1)[1]) for c in captions]
  assert scores == sorted(scores, reverse=True)
  fp = int(results["normal_image_fpr"] * 6 + 0.5)
  fn = int((1 - results["normal_image_recall"]) * 8 + 0.5)
  assert sum(c.startswith("FP") for c in captions) == fp and sum(c.startswith("FN") for c in captions) == fn
  # The overlays next to the report are titled PNGs.
  overlay = next((tmp_path / "eval" / "overlays").glob("*.png"))
  assert "score" in Image.open(overlay).text["Title"]


_CHECK = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var bad = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); })
                .map(function (i) { return i.alt; });
  var pre = document.createElement('pre');
  pre.id = 'imgcheck';
  pre.textContent = JSON.stringify({n: imgs.length, bad: bad});
  document.body.appendChild(pre);
});
</script>"""


def _chromium():
  exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
  if exe is None:
    pytest.skip("headless Chromium not installed (Debian: apt-get install chromium); .ci/run installs it")
  return exe


def test_every_image_loads_in_headless_chromium(tmp_path):
  exe = _chromium()
  page_path, _ = _fake_evaluation(tmp_path)
  checked = tmp_path / "checked.html"
  checked.write_text(page_path.read_text().replace("</body>", _CHECK + "</body>"))
  common = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=20000"]
  r = subprocess.run(common + ["--dump-dom", checked.as_uri()], capture_output=True, text=True, timeout=120)
  found = re.search(r'<pre id="imgcheck">(.*?)</pre>', r.stdout, re.S)
  assert found, f"no result from Chromium: {r.stderr[-2000:]}"
  result = json.loads(html.unescape(found.group(1)))
  assert result["bad"] == [] and result["n"] >= 6 + 4, result
  # A screenshot of the page renders (not blank).
  shot = tmp_path / "report.png"
  subprocess.run(common + ["--hide-scrollbars", "--window-size=1300,2400", f"--screenshot={shot}",
                           page_path.as_uri()], capture_output=True, text=True, timeout=120)
  pixels = np.asarray(Image.open(shot).convert("L"))
  assert pixels.std() > 10
