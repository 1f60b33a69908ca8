"""A small synthetic textile category in the MVTec AD layout, so the demo needs no download.

Good images are a denim-like 3/1 twill: warp and weft threads with rounded profiles, per-thread colour
and thickness irregularities, fibre streaks running along each thread, a slight random rotation and
waviness of the weave, a gentle illumination gradient and sensor grain. Every image draws its own
parameters, so good images vary but look alike.

Defects are made by generators unrelated to DRAEM's training-time synthesis (no Perlin noise, no
texture pasting), so the demo measures generalisation rather than recall of the simulator:

* ``scratch``  -- thin bright or dark poly-lines;
* ``hole``     -- dark ellipses with a ragged, soft rim;
* ``stain``    -- a low-contrast brownish tint shaped by a few Gaussians, with a tide line;
* ``misprint`` -- a region where the weave is shifted by half a thread and rotated.

A defect changes the scene only inside its mask, before illumination and grain are applied, so each
mask is exact: the defective image equals its clean counterpart bit for bit outside the mask.
Everything is a pure function of ``(seed, split, index)``; a 124-image category takes about a second.
"""

import json
import os
import pathlib
import shutil
import tempfile
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

DEFECT_TYPES = ("scratch", "hole", "stain", "misprint")
MARKER = ".draem_jax_demo.json"
_FORMAT_VERSION = 1
_SPLITS = {"train": 0, "test_good": 1, "test_defect": 2}
_SUPERSAMPLE = 2  # the weave is rendered at 2x and box-filtered, like a camera's pixel integration


def _rng(seed: int, *path: int) -> np.random.Generator:
  return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=path))


# ------------------------------------------------------------------------------------------- fabric


def fabric_params(rng: np.random.Generator, image_size: int) -> dict:
  """Draws the look of one good image.

  Args:
    rng: NumPy generator (consumed).
    image_size: side length S in pixels; geometry scales with S / 128.

  Returns:
    dict of NumPy scalars/arrays, consumed by ``render_fabric`` and ``finish``.
  """
  scale = image_size / 128
  jitter = rng.normal(0, 1, 3)
  return {
      "period": scale * rng.uniform(5.6, 6.6),      # pixels per thread
      "angle": rng.uniform(-3.0, 3.0),              # degrees
      "phase": rng.uniform(0, 4, 2),                # threads (the twill repeats every 4)
      "wave_amp": rng.uniform(0.08, 0.22),          # threads
      "wave_len": scale * rng.uniform(35, 70),      # pixels
      "wave_phase": rng.uniform(0, 2 * np.pi, 2),
      # Indigo warp, off-white weft; small per-image shifts of shade and dye.
      "warp_rgb": np.clip(np.array([0.17, 0.25, 0.45]) * (1 + 0.06 * jitter[0])
                          + 0.02 * rng.normal(0, 1, 3), 0, 1),
      "weft_rgb": np.clip(np.array([0.66, 0.69, 0.78]) * (1 + 0.04 * jitter[1])
                          + 0.015 * rng.normal(0, 1, 3), 0, 1),
      "thread_gain": rng.uniform(0.82, 1.15, (2, 64)),   # per warp / weft thread
      "thread_width": rng.uniform(0.75, 1.0, (2, 64)),
      "fibre": rng.normal(0, 1, (2, 64, 32)),           # streaks along each thread
      # Faded, mottled dye: a few random low-frequency waves (frequency in cycles per pixel).
      "mottle_freq": rng.normal(0, 1, (4, 2)) / (scale * rng.uniform(25, 70, (4, 1))),
      "mottle_phase": rng.uniform(0, 2 * np.pi, 4),
      "light_dir": rng.uniform(0, 2 * np.pi),
      "light_gain": rng.uniform(0.04, 0.14),
      "brightness": 1 + 0.05 * jitter[2],
      "noise_seed": int(rng.integers(2**31)),
  }


def _thread_profile(frac: np.ndarray, width: np.ndarray) -> np.ndarray:
  """Rounded cross-section of a thread: 1 at its centre, 0 in the gap beside it."""
  d = np.abs(frac - 0.5) * 2 / width  # 0 at the centre, 1 at the thread's edge
  return np.sqrt(np.clip(1 - d * d, 0, 1))


def _fibre(table: np.ndarray, thread: np.ndarray, along: np.ndarray) -> np.ndarray:
  """Smooth noise that varies along a thread (linear interpolation) and jumps between threads."""
  x = along * 2.0  # two noise samples per thread crossing: streaks a few pixels long
  x0 = np.floor(x).astype(np.int64)
  t = x - x0
  rows, n = thread % table.shape[0], table.shape[1]
  return table[rows, x0 % n] * (1 - t) + table[rows, (x0 + 1) % n] * t


def render_fabric(params: dict, image_size: int, shift: tuple[float, float] = (0.0, 0.0),
                  extra_angle: float = 0.0) -> np.ndarray:
  """The clean scene (reflectance under even light) of one image.

  Args:
    params: from ``fabric_params``.
    image_size: S.
    shift: extra (warp, weft) phase in threads (used by the misprint defect).
    extra_angle: extra rotation of the weave in degrees (used by the misprint defect).

  Returns:
    float64 (S, S, 3) in [0, 1].
  """
  n = image_size * _SUPERSAMPLE
  c = (np.arange(n) + 0.5) / _SUPERSAMPLE - image_size / 2  # pixel centres, origin at the middle
  y, x = np.meshgrid(c, c, indexing="ij")
  a = np.deg2rad(params["angle"] + extra_angle)
  xr, yr = np.cos(a) * x + np.sin(a) * y, -np.sin(a) * x + np.cos(a) * y
  period = params["period"]
  # u counts warp threads (they run vertically), v weft threads; both wave gently.
  u = xr / period + params["phase"][0] + shift[0] + params["wave_amp"] * np.sin(
      2 * np.pi * yr / params["wave_len"] + params["wave_phase"][0])
  v = yr / period + params["phase"][1] + shift[1] + params["wave_amp"] * np.sin(
      2 * np.pi * xr / params["wave_len"] + params["wave_phase"][1])
  i, j = np.floor(u).astype(np.int64), np.floor(v).astype(np.int64)
  fu, fv = u - i, v - j
  k = params["thread_gain"].shape[1]
  # 3/1 twill: the warp floats over three weft threads, then under one, stepping one thread per row.
  warp_top = (i - j) % 4 != 0
  # A warp float starts at weft row i + 1 (mod 4) and spans three rows; it bulges in its middle.
  along_float = ((v - i - 1) % 4) / 3
  warp_shade = _thread_profile(fu, params["thread_width"][0, i % k]) * (
      0.75 + 0.25 * np.sin(np.pi * along_float.clip(0, 1)))
  weft_shade = _thread_profile(fv, params["thread_width"][1, j % k]) * (0.8 + 0.2 * np.sin(
      np.pi * fu))
  warp_tex = params["thread_gain"][0, i % k] * (1 + 0.12 * _fibre(params["fibre"][0], i, v))
  weft_tex = params["thread_gain"][1, j % k] * (1 + 0.08 * _fibre(params["fibre"][1], j, u))
  shade = np.where(warp_top, warp_shade, weft_shade)
  tex = np.where(warp_top, warp_tex, weft_tex)
  rgb = np.where(warp_top[..., None], params["warp_rgb"], params["weft_rgb"])
  mottle = sum(np.cos(2 * np.pi * (f[0] * x + f[1] * y) + ph)
               for f, ph in zip(params["mottle_freq"], params["mottle_phase"]))
  scene = rgb * (tex * (0.3 + 0.7 * shade) * (1 + 0.04 * mottle))[..., None]
  # Box filter the supersampled scene down to the output grid.
  s = _SUPERSAMPLE
  scene = scene.reshape(image_size, s, image_size, s, 3).mean(axis=(1, 3))
  return np.clip(scene * params["brightness"], 0, 1)


def finish(scene: np.ndarray, params: dict) -> np.ndarray:
  """Illumination gradient, sensor grain and 8-bit quantisation.

  Args:
    scene: float (S, S, 3) in [0, 1].
    params: from ``fabric_params`` (the grain comes from its ``noise_seed``).

  Returns:
    uint8 (S, S, 3).
  """
  size = scene.shape[0]
  c = (np.arange(size) + 0.5) / size - 0.5
  y, x = np.meshgrid(c, c, indexing="ij")
  ramp = np.cos(params["light_dir"]) * x + np.sin(params["light_dir"]) * y
  light = 1 + params["light_gain"] * 2 * ramp - 0.05 * (x * x + y * y)
  rng = np.random.default_rng(params["noise_seed"])
  grain = 0.018 * rng.normal(0, 1, (size, size, 1)) + 0.006 * rng.normal(0, 1, (size, size, 3))
  img = scene * light[..., None] + grain
  return np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------ defects


def _centre(rng: np.random.Generator, size: int) -> np.ndarray:
  return rng.uniform(0.25 * size, 0.75 * size, 2)  # (x, y), keeps defects inside the frame


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
  c = np.arange(size) + 0.5
  return np.meshgrid(c, c, indexing="ij")  # (y, x) pixel centres


def _scratch(scene, params, rng, size):
  scale = size / 128
  pts = [_centre(rng, size)]
  heading = rng.uniform(0, 2 * np.pi)
  for _ in range(rng.integers(3, 7)):
    heading += rng.normal(0, 0.5)  # persistent direction: a scratch is a gently bent line
    step = scale * rng.uniform(6, 16)
    pts.append(np.clip(pts[-1] + step * np.array([np.cos(heading), np.sin(heading)]),
                       2, size - 2))
  canvas = Image.new("L", (size, size), 0)
  ImageDraw.Draw(canvas).line([tuple(p) for p in pts], fill=255,
                              width=int(round(scale * rng.uniform(1.5, 3.0))), joint="curve")
  mask = np.asarray(canvas) > 0
  bright = rng.random() < 0.5
  colour = rng.uniform(0.85, 0.97, 3) if bright else rng.uniform(0.03, 0.10, 3)
  alpha = rng.uniform(0.7, 0.9) * (1 + 0.1 * rng.normal(0, 1, (size, size))).clip(0.5, 1.2)
  out = scene * (1 - alpha[..., None]) + colour * alpha[..., None]
  return out, mask


def _hole(scene, params, rng, size):
  scale = size / 128
  cx, cy = _centre(rng, size)
  a = scale * rng.uniform(5.0, 10.0)
  b = a * rng.uniform(0.5, 1.0)
  th = rng.uniform(0, np.pi)
  y, x = _grid(size)
  dx, dy = x - cx, y - cy
  xr, yr = np.cos(th) * dx + np.sin(th) * dy, -np.sin(th) * dx + np.cos(th) * dy
  phi = np.arctan2(yr, xr)
  # Ragged edge: broken threads make the outline irregular.
  ragged = 1 + 0.08 * np.sin(5 * phi + rng.uniform(0, 6.3)) + 0.05 * np.sin(
      11 * phi + rng.uniform(0, 6.3))
  r = np.sqrt((xr / a) ** 2 + (yr / b) ** 2) / ragged
  mask = r < 1
  core = rng.uniform(0.02, 0.07) * np.ones(3)
  frayed = np.clip(scene * 1.2 + 0.06, 0, 1)  # loose fibres at the rim catch the light
  t = np.clip((r - 0.6) / 0.4, 0, 1)[..., None]
  t = t * t * (3 - 2 * t)
  return core * (1 - t) + frayed * t, mask


def _stain(scene, params, rng, size):
  scale = size / 128
  centre = _centre(rng, size)
  y, x = _grid(size)
  field = np.zeros((size, size))
  for _ in range(rng.integers(3, 6)):
    cx, cy = centre + scale * rng.normal(0, 6, 2)
    sx, sy = scale * rng.uniform(4, 10, 2)
    field += rng.uniform(0.5, 1.0) * np.exp(-0.5 * (((x - cx) / sx) ** 2 + ((y - cy) / sy) ** 2))
  field /= field.max()
  level = rng.uniform(0.3, 0.5)
  mask = field > level
  # Dirt is absorbed unevenly: darker where dense, a darker tide line where the liquid dried.
  strength = rng.uniform(0.45, 0.6) * (0.7 + 0.3 * (field - level) / (1 - level))
  strength = strength + 0.15 * np.exp(-(((field - level) / 0.06) ** 2))
  # Coffee-brown: pulls the blue towards brown and darkens a little.
  brown = np.array([0.42, 0.30, 0.16]) * rng.uniform(0.8, 1.1)
  lum = scene.mean(axis=-1, keepdims=True)
  out = scene * (1 - strength[..., None]) + strength[..., None] * brown * (0.5 + 1.2 * lum)
  return out, mask


def _misprint(scene, params, rng, size):
  scale = size / 128
  cx, cy = _centre(rng, size)
  w, h = scale * rng.uniform(14, 26, 2)
  th = rng.uniform(0, np.pi)
  corners = np.array([[-w, -h], [w, -h], [w, h], [-w, h]])
  rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
  poly = corners @ rot.T + np.array([cx, cy])
  canvas = Image.new("L", (size, size), 0)
  ImageDraw.Draw(canvas).polygon([tuple(p) for p in poly], fill=255)
  mask = np.asarray(canvas) > 0
  angle = rng.choice([-1, 1]) * rng.uniform(12, 35)
  shifted = render_fabric(params, size, shift=(0.5 + rng.uniform(0, 2), 0.5 + rng.uniform(0, 2)),
                          extra_angle=angle)
  return shifted, mask


_DEFECTS: dict[str, Callable] = {
    "scratch": _scratch, "hole": _hole, "stain": _stain, "misprint": _misprint}


def render_example(seed: int, split: str, index: int, image_size: int = 128,
                   defect: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """One image and its ground truth, a pure function of the arguments.

  Args:
    seed: dataset seed.
    split: ``"train"``, ``"test_good"`` or ``"test_defect"`` (each draws its own images).
    index: image number within the split.
    image_size: S.
    defect: None for a good image, else one of ``DEFECT_TYPES``. The same ``(seed, split, index)``
      with ``defect=None`` gives the clean counterpart of a defective image.

  Returns:
    image uint8 (S, S, 3) and mask bool (S, S) (all False for good images).
  """
  if split not in _SPLITS:
    raise ValueError(f"split={split!r}: expected one of {tuple(_SPLITS)}.")
  if defect is not None and defect not in _DEFECTS:
    raise ValueError(f"defect={defect!r}: expected None or one of {DEFECT_TYPES}.")
  rng = _rng(seed, _SPLITS[split], index)
  params = fabric_params(rng, image_size)
  scene = render_fabric(params, image_size)
  mask = np.zeros((image_size, image_size), bool)
  if defect is not None:
    changed, mask = _DEFECTS[defect](scene, params, rng, image_size)
    scene = np.where(mask[..., None], np.clip(changed, 0, 1), scene)  # exact masks by construction
  return finish(scene, params), mask


# ----------------------------------------------------------------------------------------- writing


def _defect_counts(num_test_defect: int) -> dict[str, int]:
  base, extra = divmod(num_test_defect, len(DEFECT_TYPES))
  return {d: base + (i < extra) for i, d in enumerate(DEFECT_TYPES)}


def _settings(category, image_size, num_train, num_test_good, num_test_defect, seed) -> dict:
  return {"format": _FORMAT_VERSION, "category": category, "image_size": image_size,
          "num_train": num_train, "num_test_good": num_test_good,
          "num_test_defect": num_test_defect, "seed": seed}


def write_demo_category(root: str | os.PathLike, category: str = "demo_fabric",
                        image_size: int = 128, num_train: int = 64, num_test_good: int = 20,
                        num_test_defect: int = 40, seed: int = 0) -> pathlib.Path:
  """Writes the demo category in the MVTec AD layout.

  Layout: ``root/category/train/good/NNN.png``, ``test/good/NNN.png``,
  ``test/<defect>/NNN.png`` and ``ground_truth/<defect>/NNN_mask.png`` (single-channel, 0/255), for
  ``<defect>`` in ``DEFECT_TYPES`` (defects split as evenly as possible), plus a marker file
  ``.draem_jax_demo.json`` holding the settings. The folder is built beside its target and renamed
  into place, so an interrupted write leaves no half-written category.

  Args:
    root: dataset root (created if missing).
    category: folder name.
    image_size: side length S (square RGB images).
    num_train, num_test_good, num_test_defect: image counts.
    seed: every image is a pure function of (seed, split, index).

  Returns:
    Path of ``root/category``.

  Raises:
    ValueError: bad counts or size, or ``root/category`` exists and is not a demo folder.
  """
  if image_size < 32:
    raise ValueError(f"image_size={image_size}: the demo fabric needs at least 32 pixels.")
  if num_train < 1 or num_test_good < 0 or num_test_defect < 0:
    raise ValueError(f"counts must be num_train >= 1, num_test_good/num_test_defect >= 0; got "
                     f"{num_train}, {num_test_good}, {num_test_defect}.")
  root = pathlib.Path(root)
  target = root / category
  if target.exists() and not (target / MARKER).is_file():
    raise ValueError(f"{target} exists and was not written by draem_jax.data.demo (no {MARKER}); "
                     "refusing to overwrite it. Pick another root or category.")
  root.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{category}.", dir=root))
  try:
    def save(image, folder, name, mask=None):
      (tmp / folder).mkdir(parents=True, exist_ok=True)
      Image.fromarray(image).save(tmp / folder / f"{name}.png")
      if mask is not None:
        gt = tmp / "ground_truth" / pathlib.PurePath(folder).name
        gt.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(gt / f"{name}_mask.png")

    for i in range(num_train):
      save(render_example(seed, "train", i, image_size)[0], "train/good", f"{i:03d}")
    for i in range(num_test_good):
      save(render_example(seed, "test_good", i, image_size)[0], "test/good", f"{i:03d}")
    index = 0
    for defect, count in _defect_counts(num_test_defect).items():
      for i in range(count):
        # Files are numbered within their defect folder, as in MVTec; draws use a split-wide index.
        image, mask = render_example(seed, "test_defect", index, image_size, defect)
        save(image, f"test/{defect}", f"{i:03d}", mask)
        index += 1
    settings = _settings(category, image_size, num_train, num_test_good, num_test_defect, seed)
    (tmp / MARKER).write_text(json.dumps(settings, indent=1) + "\n")
    if target.exists():  # an older demo folder of ours (checked above)
      shutil.rmtree(target)
    os.replace(tmp, target)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return target


def ensure_demo_dataset(root: str | os.PathLike, category: str = "demo_fabric",
                        **kwargs) -> pathlib.Path:
  """Writes the demo category once and reuses it afterwards.

  The folder is reused when its marker file records the requested settings, rewritten when the
  marker records other settings, and never touched when it has no marker (a user's own data).

  Args:
    root: dataset root.
    category: folder name.
    **kwargs: ``write_demo_category`` settings (image_size, num_train, num_test_good,
      num_test_defect, seed).

  Returns:
    Path of ``root/category``.
  """
  target = pathlib.Path(root) / category
  defaults = dict(image_size=128, num_train=64, num_test_good=20, num_test_defect=40, seed=0)
  unknown = set(kwargs) - set(defaults)
  if unknown:
    raise TypeError(f"ensure_demo_dataset got unknown settings {sorted(unknown)}; expected "
                    f"{sorted(defaults)}.")
  settings = _settings(category, **{**defaults, **kwargs})
  marker = target / MARKER
  if marker.is_file():
    try:
      if json.loads(marker.read_text()) == settings:
        return target
    except (OSError, json.JSONDecodeError):
      pass  # an unreadable marker of ours: rewrite the folder
  return write_demo_category(root, category, **{**defaults, **kwargs})
