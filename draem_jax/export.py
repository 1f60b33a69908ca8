r"""Exports a trained run for deployment: the whole decision in one file, StableHLO or ONNX.

  python -m draem_jax.export --workdir=workdirs/bottle --format=stablehlo --output=bottle.stablehlo
  python -m draem_jax.export --workdir=workdirs/bottle --format=onnx --output=bottle.onnx
  python -m draem_jax.export --workdir=workdirs/bottle --format=all --output=deploy/bottle \
      --input_size=1024x1280

The exported function takes ``images``: uint8 ``(N, H, W, 3)`` RGB, N dynamic, H x W the model's resolution
(or the camera resolution given by ``--input_size``, which embeds the project's bilinear resize,
``image_io.resize_bilinear``, bit for bit). Inside: uint8 -> float (the pipeline's exact table), the
channel order the weights need (BGR for the released checkpoints), both networks in eval mode, softmax, the
filtered-max image score; i.e. ``steps.make_infer_fn``, the function that ``predict`` runs. Outputs:

* ``anomaly_map`` float32 ``(N, S, S)`` at the model's resolution S (``predict`` resizes it back to each
  image's size for its PNGs);
* ``score`` float32 ``(N,)``;
* ``decision`` bool ``(N,)``: ``score >= image threshold``; ``mask`` bool ``(N, S, S)``:
  ``anomaly_map >= pixel threshold``. Only when the run has thresholds for the exported checkpoint
  (``WORKDIR/thresholds.json``) or ``--image_threshold``/``--pixel_threshold`` give them; otherwise the
  export says so and leaves these two outputs out. The thresholds are stored as the smallest float32 at or
  above the float64 value, so the float32 comparison decides exactly as ``predict`` does.

Formats (``--format`` may be repeated, or ``all``; with several formats ``--output`` is a stem and the
files get the suffixes ``.stablehlo`` / ``.onnx``):

* ``stablehlo``: ``jax.export`` serialisation (weights embedded). ``load(path)`` runs it, and so does plain
  JAX: ``jax.export.deserialize(open(path, "rb").read()).call(images)`` (needs ``flatbuffers``).
  ``--platforms=cpu,cuda,tpu`` lowers for more than the CPU.
* ``onnx``: converted by jax2onnx from the same JAX function. jax2onnx pins ``orbax-checkpoint<0.11.37``,
  which this project's own stack cannot take, so the conversion runs in a separate environment
  (``tools/make_export_venv.sh`` makes ``.venv-export``; ``--export_python`` or ``DRAEM_JAX_EXPORT_PYTHON``
  name another interpreter) that gets the weights as a ``.npz`` (``draem_jax.export_onnx``). The file is
  checked there with onnxruntime against JAX on two probe images before it is kept.

Beside each file, ``FILE.json``: input spec, outputs, thresholds, checkpoint step, config summary,
versions, the file's sha256 (and the ONNX probe check). Existing files are never replaced unless
``--overwrite``; every input is checked before anything is written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import subprocess
import tempfile
import time
from typing import Any, Callable, Sequence

from absl import app
from absl import flags
from absl import logging
import flax
import jax
import jax.numpy as jnp
import numpy as np

import draem_jax
from draem_jax import models
from draem_jax import rundir
from draem_jax import steps
from draem_jax import validation
from draem_jax import writers
from draem_jax.data import image_io

FLAGS = flags.FLAGS

FORMATS = ("stablehlo", "onnx")
SUFFIXES = {"stablehlo": ".stablehlo", "onnx": ".onnx"}
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
INPUT_NAME = "images"
OUTPUT_NAMES = ("anomaly_map", "score", "decision", "mask")
SIDECAR_SUFFIX = ".json"
# Largest --input_size side: the embedded resize gathers with int32 indices and one 16k x 16k RGB frame is
# already 800 MB; anything larger is almost certainly a typo.
MAX_INPUT_SIDE = 16384
EXPORT_PYTHON_ENV = "DRAEM_JAX_EXPORT_PYTHON"
EXPORT_VENV = ".venv-export"
MAKE_EXPORT_VENV = "tools/make_export_venv.sh"
ONNX_OPSET = 23


def define_flags() -> None:
  """Command-line flags; defined only when run as a program, so the library imports cleanly."""
  flags.DEFINE_string("workdir", None, "Work directory of a trained or converted run.")
  flags.DEFINE_multi_string("format", None, "stablehlo, onnx or all (may be repeated).")
  flags.DEFINE_string("output", None, "Output file (with several formats: a stem; suffixes are added).")
  flags.DEFINE_string("input_size", None, "HxW: camera resolution to accept; embeds the bilinear resize "
                      "to the model's resolution (default: the model's resolution, no resize).")
  flags.DEFINE_float("image_threshold", None, "Image threshold (default: the stored one).")
  flags.DEFINE_float("pixel_threshold", None, "Pixel threshold (default: the stored one).")
  flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the one predict uses).")
  flags.DEFINE_string("platforms", "cpu", f"StableHLO: comma-separated platforms to lower for, of "
                      f"{PLATFORMS}.")
  flags.DEFINE_string("export_python", None, f"ONNX: Python interpreter with jax2onnx (default: "
                      f"${EXPORT_PYTHON_ENV}, else {EXPORT_VENV}/bin/python beside the package).")
  flags.DEFINE_bool("overwrite", False, "Replace existing output files.")
  flags.mark_flags_as_required(["workdir", "format", "output"])


# ----------------------------------------------------------------------------------------------------
# What is exported.
# ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DeploySpec:
  """Everything the exported function depends on besides the weights.

  Attributes:
    model_size: S, the square resolution the model runs at (``config.image_size``).
    input_size: (H, W) of the input images; different from (S, S) embeds the resize.
    channel_order: "rgb", or "bgr" for weights trained on OpenCV images.
    filter_size: mean-filter size of the image score (``config.eval.score_filter_size``).
    image_threshold: float32 image threshold, or None (no decision outputs).
    pixel_threshold: float32 pixel threshold, or None.
  """
  model_size: int
  input_size: tuple[int, int]
  channel_order: str = "rgb"
  filter_size: int = 21
  image_threshold: float | None = None
  pixel_threshold: float | None = None

  @property
  def has_decisions(self) -> bool:
    return self.image_threshold is not None and self.pixel_threshold is not None

  @property
  def output_names(self) -> tuple[str, ...]:
    return OUTPUT_NAMES if self.has_decisions else OUTPUT_NAMES[:2]

  def to_json(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self), "input_size": list(self.input_size)}

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> "DeploySpec":
    return cls(**{**d, "input_size": tuple(int(v) for v in d["input_size"])})


def float32_threshold(t: float) -> float:
  """The smallest float32 >= ``t``: for float32 s, ``s >= result`` (float32) iff ``s >= t`` (float64).

  ``predict`` compares float32 scores with float64 thresholds; the exported graph compares in float32.
  """
  t32 = np.float32(t)
  if float(t32) < float(t):
    t32 = np.nextafter(t32, np.float32(np.inf))
  return float(t32)


def resize_bilinear(images: jax.Array, size: tuple[int, int]) -> jax.Array:
  """``image_io.resize_bilinear`` (OpenCV INTER_LINEAR, 11-bit fixed point) of a uint8 batch, in jnp.

  The taps come from ``image_io`` itself; the arithmetic is the same integer sequence, so the result is
  bit-identical. Shifts are written as divisions (all operands are non-negative, so truncation equals the
  shift) because ONNX's BitShift takes unsigned integers only.

  Args:
    images: uint8 (N, H, W, C).
    size: output (height, width).

  Returns:
    uint8 (N, size[0], size[1], C).
  """
  in_h, in_w = images.shape[1:3]
  out_h, out_w = (int(s) for s in size)
  if (in_h, in_w) == (out_h, out_w):
    return images
  # pylint: disable=protected-access  (one definition of the taps: image_io's)
  y0, y1, by0, by1 = image_io._axis_taps(in_h, out_h, clamp_weight=False)
  x0, x1, ax0, ax1 = image_io._axis_taps(in_w, out_w, clamp_weight=True)
  ax0, ax1 = (jnp.asarray(a, jnp.int32)[None, None, :, None] for a in (ax0, ax1))
  by0, by1 = (jnp.asarray(b, jnp.int32)[None, :, None, None] for b in (by0, by1))

  def horizontal(rows):
    h = (jnp.take(rows, x0, axis=2).astype(jnp.int32) * ax0
         + jnp.take(rows, x1, axis=2).astype(jnp.int32) * ax1)
    return jax.lax.div(h, jnp.int32(16))  # >> 4

  top = jax.lax.div(horizontal(jnp.take(images, y0, axis=1)) * by0, jnp.int32(65536))  # >> 16
  bottom = jax.lax.div(horizontal(jnp.take(images, y1, axis=1)) * by1, jnp.int32(65536))
  out = jax.lax.div(top + bottom + 2, jnp.int32(4))  # rounding >> 2
  return jnp.minimum(out, 255).astype(jnp.uint8)


def make_example_fn(model: models.DRAEM, variables: Any, spec: DeploySpec) -> Callable[[jax.Array], tuple]:
  """The exported computation for one image: uint8 (H, W, 3) RGB -> a tuple in ``spec.output_names`` order.

  The weights are closed over, so they are embedded in the exported file. The export batches this with
  ``jax.vmap`` (``make_deploy_fn``) instead of tracing the model with a symbolic batch dimension: the
  model's Python code may read concrete shapes (``conv.conv3x3`` picks its CPU gradient kernel by the
  number of rows), and the ONNX route converts the jaxpr of this function, which has no batch dimension.
  """
  infer = steps.make_infer_fn(model, filter_size=spec.filter_size, bgr=spec.channel_order == "bgr")
  size = (spec.model_size, spec.model_size)

  def example(image):
    maps, scores, _ = infer(variables, resize_bilinear(image[None], size))
    out = (maps[0], scores[0])
    if spec.has_decisions:
      out += (scores[0] >= jnp.float32(spec.image_threshold), maps[0] >= jnp.float32(spec.pixel_threshold))
    return out

  return example


def batched(example: Callable[[jax.Array], tuple], spec: DeploySpec) -> Callable[[jax.Array], dict]:
  """``example`` over a batch: ``images`` uint8 (N, H, W, 3) -> dict of ``spec.output_names``."""

  def deploy(images):
    if images.dtype != jnp.uint8 or tuple(images.shape[1:]) != (*spec.input_size, 3):
      raise ValueError(f"images must be uint8 (N, {spec.input_size[0]}, {spec.input_size[1]}, 3), got "
                       f"{images.dtype} {images.shape}")
    return dict(zip(spec.output_names, jax.vmap(example)(images)))

  return deploy


def make_deploy_fn(model: models.DRAEM, variables: Any, spec: DeploySpec) -> Callable[[jax.Array], dict]:
  """The exported function: ``images`` uint8 (N, H, W, 3) RGB -> dict of ``spec.output_names``:
  ``anomaly_map`` float32 (N, S, S), ``score`` float32 (N,), and with thresholds ``decision`` bool (N,),
  ``mask`` bool (N, S, S)."""
  return batched(make_example_fn(model, variables, spec), spec)


def model_kwargs(model: models.DRAEM) -> dict[str, Any]:
  """The constructor arguments of ``model`` as JSON values (rebuilt by the ONNX environment)."""
  return {"recon_width": int(model.recon_width), "disc_width": int(model.disc_width),
          "dtype": jnp.dtype(model.dtype).name, "disc_input_order": model.disc_input_order}


def build_model(kwargs: dict[str, Any]) -> models.DRAEM:
  return models.DRAEM(**{**kwargs, "dtype": jnp.dtype(kwargs["dtype"])})


def export_stablehlo(fn: Callable, spec: DeploySpec, platforms: Sequence[str] = ("cpu",)) -> bytes:
  """Serialises ``fn`` with ``jax.export``, batch dimension symbolic."""
  (n,) = jax.export.symbolic_shape("N")
  arg = jax.ShapeDtypeStruct((n, *spec.input_size, 3), jnp.uint8)
  exported = jax.export.export(jax.jit(fn), platforms=tuple(platforms))(arg)
  return bytes(exported.serialize())


# ----------------------------------------------------------------------------------------------------
# Checking the request: one line per problem, before anything is written.
# ----------------------------------------------------------------------------------------------------

def parse_formats(values: Sequence[str] | str) -> tuple[str, ...]:
  """``--format`` values (repeated and/or comma-separated, ``all``) -> formats in FORMATS order."""
  values = [values] if isinstance(values, str) else list(values or [])
  names = [v.strip().lower() for value in values for v in value.split(",") if v.strip()]
  if not names:
    raise ValueError(f"--format is empty; give one of {', '.join(FORMATS)} or all.")
  for name in names:
    if name not in FORMATS + ("all",):
      raise ValueError(f"--format={name} is unknown; give one of {', '.join(FORMATS)} or all.")
  return FORMATS if "all" in names else tuple(f for f in FORMATS if f in names)


def parse_input_size(text: str | None, model_size: int) -> tuple[int, int]:
  """``--input_size=HxW`` -> (H, W); None -> the model's resolution."""
  if text is None or text == "":
    return (model_size, model_size)
  m = re.fullmatch(r"\s*(\d+)\s*[xX,]\s*(\d+)\s*", str(text))
  if not m:
    raise ValueError(f"--input_size={text} is not HxW (e.g. --input_size=1024x1280).")
  h, w = int(m.group(1)), int(m.group(2))
  if not (1 <= h <= MAX_INPUT_SIDE and 1 <= w <= MAX_INPUT_SIDE):
    raise ValueError(f"--input_size={text}: the model takes images from 1x1 to {MAX_INPUT_SIDE}x"
                     f"{MAX_INPUT_SIDE} pixels (resized to its {model_size}x{model_size}).")
  return (h, w)


def parse_platforms(text: str | Sequence[str]) -> tuple[str, ...]:
  names = [p.strip().lower() for p in (text.split(",") if isinstance(text, str) else text) if p.strip()]
  bad = [p for p in names if p not in PLATFORMS]
  if bad or not names:
    raise ValueError(f"--platforms={text}: give a comma-separated list of {', '.join(PLATFORMS)}.")
  return tuple(dict.fromkeys(names))


def output_files(output: str, formats: Sequence[str]) -> dict[str, str]:
  """The file of each format: ``output`` itself for one format, ``stem + suffix`` for several."""
  output = os.fspath(output)
  if not output or output.endswith(os.sep):
    raise ValueError(f"--output={output!r} names no file; give a file name such as deploy/model.onnx.")
  if len(formats) == 1:
    return {formats[0]: output}
  stem = output
  for suffix in SUFFIXES.values():
    if stem.endswith(suffix):
      stem = stem[:-len(suffix)]
  return {f: stem + SUFFIXES[f] for f in formats}


def check_output_files(files: Sequence[str], overwrite: bool) -> None:
  """Raises (one line) unless every file and its sidecar can be written."""
  for file in files:
    if os.path.isdir(file):
      raise ValueError(f"--output: {file} is a folder; give a file name such as "
                       f"{os.path.join(file, 'model')}.")
    folder = os.path.dirname(os.path.abspath(file))
    probe = folder
    while not os.path.exists(probe):
      probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
      raise ValueError(f"--output: cannot write {file}: {probe} is a file, not a folder.")
    if not os.access(probe, os.W_OK | os.X_OK):
      raise ValueError(f"--output: cannot write {file}: the folder {probe} is not writable.")
    if not overwrite:
      for f in (file, file + SIDECAR_SUFFIX):
        if os.path.lexists(f):
          raise FileExistsError(f"{f} already exists; nothing was written. Use another --output, or pass "
                                "--overwrite to replace it.")


def resolve_thresholds(workdir, step: int, image_threshold: float | None,
                       pixel_threshold: float | None) -> dict[str, Any] | None:
  """The stored thresholds of checkpoint ``step``, each overridden by its flag; None when there are none.

  Raises ValueError when only one of the two is known (a decision needs both).
  """
  stored = rundir.read_thresholds(workdir, step) or {}
  th = dict(stored)
  if image_threshold is not None:
    th["image"] = float(image_threshold)
  if pixel_threshold is not None:
    th["pixel"] = float(pixel_threshold)
  if "image" not in th and "pixel" not in th:
    return None
  if "image" not in th or "pixel" not in th:
    missing = "--image_threshold" if "image" not in th else "--pixel_threshold"
    raise ValueError(f"no thresholds stored for checkpoint step {step} of {workdir}; give {missing} too "
                     "(a decision needs both), or neither to export maps and scores only.")
  flagged = [n for n, v in (("image", image_threshold), ("pixel", pixel_threshold)) if v is not None]
  note = f"; {', '.join(flagged)}: command line" if flagged else ""
  th["source"] = "command line" if not stored else stored.get("source", rundir.THRESHOLDS_FILE) + note
  th["step"] = int(step)
  return th


def find_export_python(explicit: str | None = None) -> str:
  """The interpreter for the ONNX conversion (see the module docstring); raises (one line) if absent."""
  candidates = [explicit] if explicit else []
  if not explicit:
    if os.environ.get(EXPORT_PYTHON_ENV):
      candidates.append(os.environ[EXPORT_PYTHON_ENV])
    else:
      root = os.path.dirname(os.path.dirname(os.path.abspath(draem_jax.__file__)))
      candidates += [os.path.join(root, EXPORT_VENV, "bin", "python"),
                     os.path.join(os.getcwd(), EXPORT_VENV, "bin", "python")]
  for c in candidates:
    if os.path.isfile(c) and os.access(c, os.X_OK):
      return c
  where = explicit or os.environ.get(EXPORT_PYTHON_ENV) or " or ".join(dict.fromkeys(candidates))
  raise FileNotFoundError(
      f"--format=onnx needs the export environment (jax2onnx), not found at {where}: run "
      f"`bash {MAKE_EXPORT_VENV}` in the repository, or point --export_python / ${EXPORT_PYTHON_ENV} to a "
      "Python with jax2onnx and draem_jax.")


# ----------------------------------------------------------------------------------------------------
# The export.
# ----------------------------------------------------------------------------------------------------

def sha256_file(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      h.update(block)
  return h.hexdigest()


def _versions() -> dict[str, str]:
  import jaxlib  # pylint: disable=g-import-not-at-top
  return {"draem_jax": draem_jax.__version__, "jax": jax.__version__, "jaxlib": jaxlib.__version__,
          "flax": flax.__version__, "numpy": np.__version__}


def _config_summary(config) -> dict[str, Any]:
  return {"category": config.category, "image_size": int(config.image_size),
          "channel_order": config.channel_order, "dataset": config.dataset,
          "model": {k: config.model[k] for k in ("recon_width", "disc_width", "dtype")},
          "score_filter_size": int(config.eval.score_filter_size)}


def _tmp_name(file: str) -> str:
  return os.path.join(os.path.dirname(os.path.abspath(file)), f".{os.path.basename(file)}.tmp-{os.getpid()}")


def _convert_onnx(python: str, model, variables, spec: DeploySpec, out_file: str) -> dict[str, Any]:
  """Runs ``draem_jax.export_onnx`` in ``python``; returns its report (versions, probe check)."""
  with tempfile.TemporaryDirectory(prefix="draem_jax_export_") as tmp:
    weights = os.path.join(tmp, "variables.npz")
    flat = flax.traverse_util.flatten_dict(jax.device_get(dict(variables)), sep="/")
    np.savez(weights, **{k: np.asarray(v) for k, v in flat.items()})
    request = {"weights": weights, "model": model_kwargs(model), "spec": spec.to_json(),
               "output": out_file, "opset": ONNX_OPSET, "report": os.path.join(tmp, "report.json"),
               "package_dir": os.path.dirname(os.path.abspath(draem_jax.__file__))}
    with open(os.path.join(tmp, "request.json"), "w", encoding="utf-8") as f:
      json.dump(request, f)
    # The persistent compilation cache also keeps what jax2onnx compiles while it registers its plugins
    # (its examples run jitted code at import): 13 s of CPU on the first export, 5 s afterwards.
    env = {"JAX_COMPILATION_CACHE_DIR": writers.default_compilation_cache_dir(),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", **os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([python, "-m", "draem_jax.export_onnx", os.path.join(tmp, "request.json")],
                          capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0 or not os.path.exists(request["report"]):
      lines = [ln for ln in (proc.stderr + proc.stdout).strip().splitlines() if ln.strip()]
      last = lines[-1] if lines else f"exit status {proc.returncode}"
      raise RuntimeError(f"ONNX conversion in {python} failed: {last.removeprefix('error: ')}")
    with open(request["report"], encoding="utf-8") as f:
      return json.load(f)


def export_run(workdir, output: str, formats: Sequence[str] | str, *, input_size: str | None = None,
               image_threshold: float | None = None, pixel_threshold: float | None = None,
               step: int | None = None, platforms: str | Sequence[str] = "cpu",
               export_python: str | None = None, overwrite: bool = False) -> list[dict[str, Any]]:
  """Exports the model that ``predict`` would use; writes each file and its ``FILE.json`` sidecar.

  Args:
    workdir: the run.
    output: the file (one format) or stem (several).
    formats: ``--format`` values.
    input_size: ``"HxW"`` camera resolution (embeds the resize), or None.
    image_threshold, pixel_threshold: override the stored thresholds.
    step: checkpoint step (default: the one ``predict`` loads).
    platforms: StableHLO lowering platforms.
    export_python: interpreter of the ONNX route.
    overwrite: replace existing files.

  Returns:
    The sidecar of each file written.
  """
  formats = parse_formats(formats)
  platforms = parse_platforms(platforms)
  files = output_files(output, formats)
  check_output_files(list(files.values()), overwrite)
  python = find_export_python(export_python) if "onnx" in formats else None
  config = rundir.load_config(workdir)
  size = parse_input_size(input_size, int(config.image_size))
  model, variables, step, selected = validation.restore_selected(workdir, config, step=step)
  th = resolve_thresholds(workdir, step, image_threshold, pixel_threshold)
  if th is None:
    logging.warning("no thresholds stored for checkpoint step %d of %s: the export has anomaly_map and "
                    "score only (give --image_threshold and --pixel_threshold for decisions).", step, workdir)
  spec = DeploySpec(model_size=int(config.image_size), input_size=size,
                    channel_order=config.channel_order,
                    filter_size=int(config.eval.score_filter_size),
                    image_threshold=None if th is None else float32_threshold(th["image"]),
                    pixel_threshold=None if th is None else float32_threshold(th["pixel"]))
  variables = jax.device_get(dict(variables))
  fn = make_deploy_fn(model, variables, spec)

  written = []
  for fmt, file in files.items():
    os.makedirs(os.path.dirname(os.path.abspath(file)), exist_ok=True)
    tmp = _tmp_name(file)
    t0 = time.perf_counter()
    extra: dict[str, Any] = {}
    try:
      if fmt == "stablehlo":
        data = export_stablehlo(fn, spec, platforms)
        with open(tmp, "wb") as f:
          f.write(data)
        extra = {"platforms": list(platforms)}
      else:
        extra = {"onnx": _convert_onnx(python, model, variables, spec, tmp)}
      seconds = time.perf_counter() - t0
      sidecar = {
          "format": fmt, "file": os.path.basename(file), "sha256": sha256_file(tmp),
          "size_bytes": os.path.getsize(tmp), "export_seconds": round(seconds, 2),
          "input": {"name": INPUT_NAME, "dtype": "uint8", "shape": ["N", size[0], size[1], 3],
                    "channel_order": "RGB", "resize": None if size == (spec.model_size,) * 2 else
                    f"bilinear {size[0]}x{size[1]} -> {spec.model_size}x{spec.model_size} "
                    "(OpenCV INTER_LINEAR arithmetic, image_io.resize_bilinear)"},
          "outputs": _output_specs(spec),
          "thresholds": None if th is None else {**th, "image_float32": spec.image_threshold,
                                                 "pixel_float32": spec.pixel_threshold},
          "checkpoint_step": int(step), "selected": selected, "workdir": str(rundir.path(workdir)),
          "config": _config_summary(config), "spec": spec.to_json(), "versions": _versions(), **extra}
      os.replace(tmp, file)
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)
    rundir.write_json(file + SIDECAR_SUFFIX, sidecar)
    written.append({**sidecar, "path": file})
  return written


def _output_specs(spec: DeploySpec) -> dict[str, Any]:
  s = spec.model_size
  specs = {"anomaly_map": {"dtype": "float32", "shape": ["N", s, s]},
           "score": {"dtype": "float32", "shape": ["N"]},
           "decision": {"dtype": "bool", "shape": ["N"], "rule": "score >= thresholds.image_float32"},
           "mask": {"dtype": "bool", "shape": ["N", s, s], "rule": "anomaly_map >= thresholds.pixel_float32"}}
  return {k: specs[k] for k in spec.output_names}


# ----------------------------------------------------------------------------------------------------
# Loading an exported file.
# ----------------------------------------------------------------------------------------------------

class Deployed:
  """An exported file, callable: ``deployed(images uint8 (N, H, W, 3)) -> {name: np.ndarray}``.

  StableHLO runs with jax alone; ONNX with onnxruntime (CPU). When the sidecar is present its sha256 is
  checked first.
  """

  def __init__(self, path: str):
    self.path = os.fspath(path)
    if not os.path.isfile(self.path):
      raise FileNotFoundError(f"exported model not found: {self.path}")
    side = self.path + SIDECAR_SUFFIX
    self.metadata = rundir.read_json(side) if os.path.exists(side) else None
    if self.metadata is not None and self.metadata.get("sha256") != sha256_file(self.path):
      raise ValueError(f"{self.path} does not match the sha256 in {side}: it was changed after export; "
                       "export it again.")
    with open(self.path, "rb") as f:
      head = f.read(8)
    if self.path.endswith(SUFFIXES["onnx"]) or (self.metadata or {}).get("format") == "onnx":
      self.format = "onnx"
      import onnxruntime  # pylint: disable=g-import-not-at-top  (only for ONNX files)
      self._session = onnxruntime.InferenceSession(self.path, providers=["CPUExecutionProvider"])
      self.input_shape = tuple(self._session.get_inputs()[0].shape)
      self.output_names = tuple(o.name for o in self._session.get_outputs())
    else:
      self.format = "stablehlo"
      with open(self.path, "rb") as f:
        try:
          exported = jax.export.deserialize(bytearray(f.read()))
        except Exception as e:  # pylint: disable=broad-except  (flatbuffers raise anything on bad bytes)
          raise ValueError(f"{self.path} is not a jax.export (StableHLO) file ({writers.one_line(e)}; "
                           f"starts with {head!r}).") from None
      self._call = jax.jit(exported.call)
      self.input_shape = tuple(str(d) if not isinstance(d, int) else d for d in exported.in_avals[0].shape)
      self.output_names = tuple(sorted(exported.out_tree.unflatten(range(exported.out_tree.num_leaves))))

  def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != tuple(self.input_shape[1:]):
      raise ValueError(f"{self.path} takes uint8 images of shape {self.input_shape}, got {images.dtype} "
                       f"{images.shape}.")
    if self.format == "onnx":
      return dict(zip(self.output_names, self._session.run(None, {INPUT_NAME: images})))
    return {k: np.asarray(v) for k, v in self._call(images).items()}


def load(path: str) -> Deployed:
  """Loads an exported file (StableHLO or ONNX) as a callable; see ``Deployed``."""
  return Deployed(path)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  writers.quiet_library_logs()
  try:
    written = export_run(FLAGS.workdir, FLAGS.output, FLAGS.format, input_size=FLAGS.input_size,
                         image_threshold=FLAGS.image_threshold, pixel_threshold=FLAGS.pixel_threshold,
                         step=FLAGS.step, platforms=FLAGS.platforms, export_python=FLAGS.export_python,
                         overwrite=FLAGS.overwrite)
  except (FileNotFoundError, ValueError, RuntimeError, OSError) as e:
    raise SystemExit(f"error: {writers.one_line(e)}") from None
  for w in written:
    outs = ", ".join(w["outputs"])
    shape = "x".join(str(d) for d in w["input"]["shape"])
    print(f"{w['path']}  {w['format']}  {w['size_bytes'] / 2**20:.1f} MiB  step {w['checkpoint_step']}  "
          f"input {shape} uint8  outputs {outs}  sha256 {w['sha256'][:16]}")


if __name__ == "__main__":
  define_flags()
  writers.run_program(main)
