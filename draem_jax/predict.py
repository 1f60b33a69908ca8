r"""Anomaly maps, scores and decisions for new images with a trained run.

  python -m draem_jax.predict --workdir=workdirs/bottle --input=photo.png --output=out/
  python -m draem_jax.predict --workdir=workdirs/bottle --input=folder/ --output=out/

For each image (any size; resized to the model's resolution, maps resized back): the image score, the
anomaly decision at the stored image threshold, ``<stem>_heatmap.png`` and ``<stem>_mask.png`` (pixels at
or above the stored pixel threshold) in ``--output``, and one row of ``predictions.csv``. Thresholds are the
F1-optimal ones that ``draem_jax.evaluate`` stored in ``WORKDIR/eval/metrics.json``; pass
``--image_threshold`` / ``--pixel_threshold`` to use others (or when the run was never evaluated).
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any, Sequence

from absl import app
from absl import flags
import numpy as np
from PIL import Image

from draem_jax import evaluate
from draem_jax import writers
from draem_jax.data import image_io

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Command-line flags; defined only when run as a program, so the library imports cleanly."""
  flags.DEFINE_string("workdir", None, "Work directory of a trained or converted run.")
  flags.DEFINE_string("input", None, "An image file or a folder (searched recursively).")
  flags.DEFINE_string("output", None, "Output folder (created; existing files are kept).")
  flags.DEFINE_float("image_threshold", None, "Override the stored image threshold.")
  flags.DEFINE_float("pixel_threshold", None, "Override the stored pixel threshold.")
  flags.DEFINE_integer("batch_size", 8, "Images per forward pass.")
  flags.mark_flags_as_required(["workdir", "input", "output"])


def list_inputs(path: str) -> list[str]:
  """The image files named by ``--input`` (a file, or a folder searched recursively, sorted)."""
  if os.path.isfile(path):
    return [path]
  if not os.path.isdir(path):
    raise FileNotFoundError(f"--input={path} does not exist; give an image file or a folder of images.")
  found = []
  for root, _, files in os.walk(path):
    found += [os.path.join(root, f) for f in files if image_io.is_image_file(f)]
  if not found:
    raise FileNotFoundError(f"--input={path} holds no images ({', '.join(image_io.IMAGE_EXTENSIONS)}).")
  return sorted(found)


def stored_thresholds(workdir: str) -> dict[str, float]:
  path = os.path.join(workdir, "eval", "metrics.json")
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as f:
    m = json.load(f)
  return {k: float(m[k]) for k in ("image_threshold", "pixel_threshold") if k in m}


def resize_map(amap: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
  """Bilinear resize of a float map back to an image's original size."""
  return np.asarray(Image.fromarray(amap.astype(np.float32), mode="F").resize(
      (size_hw[1], size_hw[0]), Image.Resampling.BILINEAR))


def predict_files(workdir: str, paths: Sequence[str], output: str, *,
                  image_threshold: float | None = None, pixel_threshold: float | None = None,
                  batch_size: int = 8) -> list[dict[str, Any]]:
  """Runs the model of ``workdir`` on ``paths`` and writes heatmaps, masks and ``predictions.csv``."""
  workdir = os.path.abspath(workdir)
  config = evaluate.load_run_config(workdir)
  thresholds = stored_thresholds(workdir)
  image_threshold = thresholds.get("image_threshold") if image_threshold is None else image_threshold
  pixel_threshold = thresholds.get("pixel_threshold") if pixel_threshold is None else pixel_threshold
  if image_threshold is None or pixel_threshold is None:
    raise ValueError(
        f"no stored thresholds in {os.path.join(workdir, 'eval', 'metrics.json')}: run "
        f"`python -m draem_jax.evaluate --workdir={workdir}` first, or pass --image_threshold and "
        "--pixel_threshold.")
  model, variables, step = evaluate.restore_model(workdir, config)
  size = (config.image_size, config.image_size)

  originals = [image_io.load_rgb(p) for p in paths]  # raises naming an unreadable file
  batch = np.stack([image_io.resize_bilinear(im, size) for im in originals])
  maps, scores = evaluate.predict_maps(model, variables, batch, batch_size=batch_size,
                                       channel_order=config.get("channel_order", "rgb"),
                                       filter_size=config.eval.score_filter_size)
  os.makedirs(output, exist_ok=True)
  rows = []
  used = set()
  for path, original, amap, score in zip(paths, originals, maps, scores):
    stem = os.path.splitext(os.path.basename(path))[0]
    name, k = stem, 1
    while name in used:  # same file name in different sub-folders
      name, k = f"{stem}_{k}", k + 1
    used.add(name)
    full = resize_map(amap, original.shape[:2])
    heat_path = os.path.join(output, f"{name}_heatmap.png")
    mask_path = os.path.join(output, f"{name}_mask.png")
    heat = (0.5 * original + 0.5 * evaluate.heat_colormap(full)).astype(np.uint8)
    Image.fromarray(heat).save(heat_path)
    Image.fromarray(((full >= pixel_threshold) * 255).astype(np.uint8), mode="L").save(mask_path)
    rows.append({"path": path, "score": float(score), "anomalous": bool(score >= image_threshold),
                 "heatmap": heat_path, "mask": mask_path})
  with open(os.path.join(output, "predictions.csv"), "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=["path", "score", "anomalous", "heatmap", "mask"])
    writer.writeheader()
    writer.writerows(rows)
  with open(os.path.join(output, "thresholds.json"), "w", encoding="utf-8") as f:
    json.dump({"image_threshold": image_threshold, "pixel_threshold": pixel_threshold,
               "checkpoint_step": int(step)}, f, indent=2)
  return rows


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  writers.quiet_library_logs()
  try:
    rows = predict_files(FLAGS.workdir, list_inputs(FLAGS.input), FLAGS.output,
                         image_threshold=FLAGS.image_threshold,
                         pixel_threshold=FLAGS.pixel_threshold, batch_size=FLAGS.batch_size)
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f"error: {e}") from None
  for r in rows:
    print(f"{r['score']:.4f}  {'ANOMALY' if r['anomalous'] else 'ok     '}  {r['path']}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
