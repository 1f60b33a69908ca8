r"""Inspection decisions for new images with a trained run: score, decision, defect regions, heatmaps.

  python -m draem_jax.predict --workdir=workdirs/bottle --input=photos/ --output=predictions/
  python -m draem_jax.predict --workdir=workdirs/bottle --input=big.png --output=out/ --tile

Thresholds: the normal-only ones stored for the checkpoint that is loaded (``WORKDIR/thresholds.json``,
computed by training on held-out good images; see ``draem_jax.thresholds``). Thresholds stored for another
checkpoint step are refused (they belong to another model); ``--image_threshold`` / ``--pixel_threshold``
override them (e.g. for converted weights, which have none).

For each image (any size), in ``--output``, mirroring sub-folders of a folder ``--input``:

* ``<name>_heatmap.png``: the image with its anomaly map blended in, at the image's size;
* ``<name>_mask.png``: the defect regions (pixels at or above the pixel threshold, regions smaller than
  ``--min_region_area`` pixels of the original image removed), at the image's size;
* one JSON line in ``predictions.jsonl``: decision, image score, thresholds, and every region's area,
  bounding box ``[x_min, y_min, x_max, y_max]`` (inclusive, original-image pixels), max and mean score;
* one row of ``predictions.csv`` (the summary, with the region count);
* ``thresholds.json``: the thresholds, checkpoint step and settings used.

Never overwrites: if any of these files exists, nothing is written and the first one is named; pass
``--overwrite`` to replace them (other files in ``--output`` are never touched). ``--output`` is never read
as input. Images are streamed in batches (memory bounded by ``--batch_size``, whatever the folder size).
An image that cannot be read (or is larger than ``--max_image_pixels``, PIL's decompression-bomb guard)
gets a row with ``status=error`` and the reason; the others are processed, and the program exits with
status 1 after naming how many failed.
"""

from __future__ import annotations

import csv
import json
import os
import re
import warnings
from typing import Any, Sequence

from absl import app
from absl import flags
from absl import logging
import numpy as np
from PIL import Image

from draem_jax import inference
from draem_jax import regions
from draem_jax import rundir
from draem_jax import validation
from draem_jax import visualize
from draem_jax import writers
from draem_jax.data import image_io

FLAGS = flags.FLAGS
CSV_FILE = "predictions.csv"
JSONL_FILE = "predictions.jsonl"
SETTINGS_FILE = "thresholds.json"
CSV_FIELDS = ("path", "status", "score", "anomalous", "num_regions", "heatmap", "mask", "error")
# PIL's default decompression-bomb limit (Image.MAX_IMAGE_PIXELS), kept for the messages.
PIL_DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS


def define_flags() -> None:
  """Command-line flags; defined only when run as a program, so the library imports cleanly."""
  flags.DEFINE_string("workdir", None, "Work directory of a trained or converted run.")
  flags.DEFINE_string("input", None, "An image file or a folder (searched recursively).")
  flags.DEFINE_string("output", None, "Output folder (created). Existing outputs are never replaced "
                      "unless --overwrite.")
  flags.DEFINE_bool("overwrite", False, "Replace prediction files that already exist in --output.")
  flags.DEFINE_integer("step", None, "Checkpoint step to load (default: the run's selected model).")
  flags.DEFINE_float("image_threshold", None, "Override the stored image threshold.")
  flags.DEFINE_float("pixel_threshold", None, "Override the stored pixel threshold.")
  flags.DEFINE_integer("batch_size", 8, "Images (or tiles) per forward pass.")
  flags.DEFINE_bool("tile", None, "Overlapping model-size tiles instead of resizing the image "
                    "(default: config.predict.tile).")
  flags.DEFINE_float("tile_scale", None, "Rescale factor before tiling (default config.predict.tile_scale).")
  flags.DEFINE_float("tile_overlap", None, "Minimum tile overlap, fraction of a tile "
                     "(default config.predict.tile_overlap).")
  flags.DEFINE_integer("min_region_area", None, "Smallest defect region kept, in pixels of the original "
                       "image (default config.predict.min_region_area).")
  flags.DEFINE_integer("max_image_pixels", None, "Largest image decoded, in pixels; larger files are "
                       f"refused as possible decompression bombs (default PIL's {PIL_DEFAULT_MAX_PIXELS}).")
  flags.mark_flags_as_required(["workdir", "input", "output"])


# ----------------------------------------------------------------------------------------------------
# Inputs, outputs, thresholds: everything checked before anything is written.
# ----------------------------------------------------------------------------------------------------

def _inside(path: str, folder: str) -> bool:
  path, folder = os.path.realpath(path), os.path.realpath(folder)
  return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def list_inputs(path: str, exclude: str | None = None) -> list[str]:
  """The image files named by ``--input``: a file, or a folder searched recursively (sorted).

  Files inside ``exclude`` (the output folder) are skipped, so predictions are never read as input.
  """
  if os.path.isfile(path):
    return [path]
  if not os.path.isdir(path):
    raise FileNotFoundError(f"--input={path} does not exist; give an image file or a folder of images.")
  found = []
  for root, dirs, files in os.walk(path):
    if exclude is not None:
      dirs[:] = [d for d in dirs if not _inside(os.path.join(root, d), exclude)]
      if _inside(root, exclude):
        continue
    found += [os.path.join(root, f) for f in files if image_io.is_image_file(f)]
  if not found:
    raise FileNotFoundError(f"--input={path} holds no images ({', '.join(image_io.IMAGE_EXTENSIONS)})"
                            + (" outside --output" if exclude and _inside(exclude, path) else "") + ".")
  return sorted(found)


def output_names(paths: Sequence[str], input_root: str | None) -> list[str]:
  """A distinct output name (relative path without extension) per input image."""
  names, used = [], set()
  for p in paths:
    rel = os.path.relpath(p, input_root) if input_root else os.path.basename(p)
    stem, ext = os.path.splitext(rel)
    name = stem
    if name in used:  # a.png and a.jpg in one folder
      name = f"{stem}_{ext.lstrip('.')}"
    k = 1
    while name in used:
      name, k = f"{stem}_{k}", k + 1
    used.add(name)
    names.append(name)
  return names


def planned_files(output: str, names: Sequence[str]) -> list[str]:
  files = [os.path.join(output, f) for f in (CSV_FILE, JSONL_FILE, SETTINGS_FILE)]
  for n in names:
    files += [os.path.join(output, f"{n}_heatmap.png"), os.path.join(output, f"{n}_mask.png")]
  return files


def check_output(output: str, files: Sequence[str], overwrite: bool) -> None:
  """Raises (one line) when ``--output`` is a file, or would replace a file without ``--overwrite``."""
  probe = output
  while probe and not os.path.exists(probe):
    probe = os.path.dirname(probe.rstrip(os.sep))
  if os.path.exists(output) and not os.path.isdir(output):
    raise ValueError(f"--output={output} is a file, not a folder; give a folder for the predictions.")
  if probe and os.path.exists(probe) and not os.path.isdir(probe):
    raise ValueError(f"--output={output} lies below the file {probe}; give a folder path.")
  if overwrite:
    return
  existing = [f for f in files if os.path.lexists(f)]
  if existing:
    more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
    raise FileExistsError(
        f"{existing[0]} already exists{more}; nothing was written. Use another --output, or pass "
        "--overwrite to replace the predictions there.")


def resolve_thresholds(workdir, step: int, image_threshold: float | None = None,
                       pixel_threshold: float | None = None) -> dict[str, Any]:
  """The thresholds predict uses for checkpoint ``step``: stored ones, overridden per flag."""
  if image_threshold is not None and pixel_threshold is not None:
    return {"image": float(image_threshold), "pixel": float(pixel_threshold), "source": "command line",
            "step": int(step)}
  stored = rundir.read_thresholds(workdir, step)
  if stored is None or int(stored.get("step", step)) != int(step):
    file = rundir.path(workdir) / rundir.THRESHOLDS_FILE
    others = rundir.stored_threshold_steps(workdir)
    if others:
      raise ValueError(
          f"{file} has thresholds for checkpoint steps {others} but not for step {step}, the model predict "
          f"loads; thresholds of another step belong to another model. Pass --step=S for one of those "
          f"(if still kept), run `python -m draem_jax.evaluate --workdir={workdir}` to calibrate step "
          f"{step}, or give --image_threshold and --pixel_threshold.")
    raise ValueError(
        f"no thresholds stored for checkpoint step {step} ({file} absent): run `python -m "
        f"draem_jax.evaluate --workdir={workdir}` (calibrates on the held-out good images), or give "
        "--image_threshold and --pixel_threshold.")
  out = dict(stored)
  if image_threshold is not None:
    out.update(image=float(image_threshold), source=f"{stored.get('source')}; image threshold: command line")
  if pixel_threshold is not None:
    out.update(pixel=float(pixel_threshold), source=f"{stored.get('source')}; pixel threshold: command line")
  return out


def load_image(path: str) -> np.ndarray:
  """``image_io.load_rgb`` with PIL's decompression-bomb guard turned into one line naming the setting.

  Call inside ``warnings.catch_warnings()`` with DecompressionBombWarning as an error (``predict_files``
  does), so images between the limit and twice the limit are refused too instead of decoded.
  """
  try:
    try:  # the header first: PIL's size check names the pixel count (decoding happens once, below)
      with Image.open(path):
        pass
    except (OSError, ValueError, SyntaxError):
      pass  # unreadable: load_rgb names the file and the reason
    return image_io.load_rgb(path)
  except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
    m = re.search(r"\((\d+) pixels\)", str(e))
    size = f"{int(m.group(1)):,} pixels" if m else "more pixels"
    limit = Image.MAX_IMAGE_PIXELS
    raise ValueError(
        f"image file {path} has {size}, more than the decompression-bomb limit of {limit:,}; if it is a "
        f"genuine image pass --max_image_pixels={int(m.group(1)) if m else 2 * limit} (or larger).") from None


# ----------------------------------------------------------------------------------------------------
# Prediction, streamed.
# ----------------------------------------------------------------------------------------------------

def _settings(config, tile, tile_scale, tile_overlap, min_region_area) -> dict[str, Any]:
  p = config.predict
  pick = lambda flag, recorded: recorded if flag is None else flag  # noqa: E731
  crop = bool(config.train_crop)
  out = {"tile": bool(pick(tile, p.tile)) or (crop and tile is None),
         "tile_scale": float(pick(tile_scale, p.tile_scale)),
         "tile_overlap": float(pick(tile_overlap, p.tile_overlap)),
         "min_region_area": int(pick(min_region_area, p.min_region_area)),
         # A train_crop run saw its images at load_size: tiles of the image resized to that, as in
         # validation, unless a scale is given.
         "tile_resize": [int(config.load_size)] * 2 if crop and tile_scale is None else None}
  if out["min_region_area"] < 1:
    raise ValueError(f"--min_region_area={out['min_region_area']} must be >= 1 (original-image pixels).")
  if not 0 <= out["tile_overlap"] < 1:
    raise ValueError(f"--tile_overlap={out['tile_overlap']} must be in [0, 1).")
  if not out["tile_scale"] > 0:
    raise ValueError(f"--tile_scale={out['tile_scale']} must be > 0.")
  return out


def predict_files(workdir, paths: Sequence[str], output: str, *, input_root: str | None = None,
                  overwrite: bool = False, step: int | None = None, image_threshold: float | None = None,
                  pixel_threshold: float | None = None, batch_size: int = 8, tile: bool | None = None,
                  tile_scale: float | None = None, tile_overlap: float | None = None,
                  min_region_area: int | None = None, max_image_pixels: int | None = None) -> dict[str, Any]:
  """Runs the run's model on ``paths``; writes the outputs listed in the module docstring.

  Returns:
    ``{"num_images", "num_errors", "num_anomalous", "step", "thresholds", "output"}`` (rows are on disk
    only, so memory does not grow with the number of images).
  """
  if batch_size < 1:
    raise ValueError(f"--batch_size={batch_size} must be >= 1.")
  if max_image_pixels is not None and max_image_pixels < 1:
    raise ValueError(f"--max_image_pixels={max_image_pixels} must be >= 1.")
  config = rundir.load_config(workdir)
  settings = _settings(config, tile, tile_scale, tile_overlap, min_region_area)
  names = output_names(paths, input_root)
  check_output(output, planned_files(output, names), overwrite)
  model, variables, step, selected = validation.restore_selected(workdir, config, step=step)
  th = resolve_thresholds(workdir, step, image_threshold, pixel_threshold)
  if settings["tile"] and settings["tile_resize"] is None and "command line" not in th["source"]:
    logging.warning("thresholds of step %d were calibrated on held-out images resized to the model size; "
                    "tiled maps may call for other ones (--image_threshold, --pixel_threshold).", step)
  inf = inference.Inferencer(model, variables, config, batch_size=batch_size)

  os.makedirs(output, exist_ok=True)
  rundir.write_json(os.path.join(output, SETTINGS_FILE), {
      "workdir": str(rundir.path(workdir)), "step": int(step), "selected": selected,
      "image_threshold": th["image"], "pixel_threshold": th["pixel"], "thresholds": th, **settings})
  counts = {"num_images": 0, "num_errors": 0, "num_anomalous": 0}
  previous_limit = Image.MAX_IMAGE_PIXELS
  if max_image_pixels is not None:
    Image.MAX_IMAGE_PIXELS = int(max_image_pixels)
  try:
    with open(os.path.join(output, CSV_FILE), "w", newline="", encoding="utf-8") as fcsv, \
        open(os.path.join(output, JSONL_FILE), "w", encoding="utf-8") as fjson, warnings.catch_warnings():
      warnings.simplefilter("error", Image.DecompressionBombWarning)
      table = csv.DictWriter(fcsv, fieldnames=CSV_FIELDS)
      table.writeheader()
      for start in range(0, len(paths), batch_size):
        _predict_batch(inf, paths[start:start + batch_size], names[start:start + batch_size], output, th,
                       settings, int(step), table, fjson, counts)
        fcsv.flush()
        fjson.flush()
  finally:
    Image.MAX_IMAGE_PIXELS = previous_limit
  return {**counts, "step": int(step), "thresholds": th, "output": output}


def _predict_batch(inf, paths, names, output, th, settings, step, table, fjson, counts) -> None:
  images, ok_paths, ok_names = [], [], []
  for path, name in zip(paths, names):
    counts["num_images"] += 1
    try:
      images.append(load_image(path))
      ok_paths.append(path)
      ok_names.append(name)
    except (ValueError, OSError) as e:
      counts["num_errors"] += 1
      message = writers.one_line(e)
      logging.error("%s", message)
      table.writerow({"path": path, "status": "error", "error": message})
      fjson.write(json.dumps({"path": path, "status": "error", "error": message}) + "\n")
  if not images:
    return
  maps, scores = inf.images(images, tile=settings["tile"], tile_scale=settings["tile_scale"],
                            tile_overlap=settings["tile_overlap"], tile_resize=settings["tile_resize"])
  for path, name, image, amap, score in zip(ok_paths, ok_names, images, maps, scores):
    found = regions.find_regions(amap, th["pixel"], settings["min_region_area"])
    mask = regions.region_mask(amap, th["pixel"], settings["min_region_area"])
    anomalous = bool(score >= th["image"])
    counts["num_anomalous"] += anomalous
    heat_path = os.path.join(output, f"{name}_heatmap.png")
    mask_path = os.path.join(output, f"{name}_mask.png")
    os.makedirs(os.path.dirname(heat_path), exist_ok=True)
    verdict = "ANOMALOUS" if anomalous else "good"
    visualize.save_png(heat_path, visualize.heat_overlay(image, amap),
                       f"{os.path.basename(path)}: anomaly map, score {score:.4f} ({verdict})",
                       f"image threshold {th['image']:.6g}, checkpoint step {step}")
    visualize.save_png(mask_path, mask.astype(np.uint8) * 255,
                       f"{os.path.basename(path)}: defect regions ({len(found)})",
                       f"pixel threshold {th['pixel']:.6g}, min region area {settings['min_region_area']}")
    table.writerow({"path": path, "status": "ok", "score": f"{float(score):.6f}", "anomalous": anomalous,
                    "num_regions": len(found), "heatmap": heat_path, "mask": mask_path, "error": ""})
    fjson.write(json.dumps({
        "path": path, "status": "ok", "anomalous": anomalous, "score": float(score),
        "image_threshold": th["image"], "pixel_threshold": th["pixel"], "step": step,
        "height": int(image.shape[0]), "width": int(image.shape[1]), "regions": found,
        "heatmap": heat_path, "mask": mask_path}) + "\n")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  writers.quiet_library_logs()
  try:
    input_root = FLAGS.input if os.path.isdir(FLAGS.input) else None
    paths = list_inputs(FLAGS.input, exclude=FLAGS.output)
    summary = predict_files(
        FLAGS.workdir, paths, FLAGS.output, input_root=input_root, overwrite=FLAGS.overwrite,
        step=FLAGS.step, image_threshold=FLAGS.image_threshold, pixel_threshold=FLAGS.pixel_threshold,
        batch_size=FLAGS.batch_size, tile=FLAGS.tile, tile_scale=FLAGS.tile_scale,
        tile_overlap=FLAGS.tile_overlap, min_region_area=FLAGS.min_region_area,
        max_image_pixels=FLAGS.max_image_pixels)
  except (ValueError, OSError) as e:
    raise SystemExit(f"error: {writers.one_line(e)}") from None
  print(f"{summary['num_images']} images, {summary['num_anomalous']} anomalous, {summary['num_errors']} "
        f"unreadable (checkpoint step {summary['step']}): {os.path.join(FLAGS.output, CSV_FILE)}")
  if summary["num_errors"]:
    raise SystemExit(f"error: {summary['num_errors']} of {summary['num_images']} input images could not be "
                     f"read (rows with status=error in {os.path.join(FLAGS.output, CSV_FILE)}); the others "
                     "were predicted.")


if __name__ == "__main__":
  define_flags()
  writers.run_program(main)
