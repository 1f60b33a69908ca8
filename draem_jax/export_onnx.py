r"""The ONNX half of ``draem_jax.export``, run inside the export environment (jax2onnx).

  .venv-export/bin/python -m draem_jax.export_onnx REQUEST.json

jax2onnx 0.17.1 (the newest release) requires ``orbax-checkpoint<0.11.37`` while this project resolves
orbax 0.12, so it cannot be installed beside the project's stack; ``tools/make_export_venv.sh`` makes a
separate environment with the same jax and flax, jax2onnx, onnxruntime and this package (no orbax use:
``draem_jax.export`` restores the checkpoint and hands the weights over as a ``.npz``). This program
rebuilds the model, builds the very function that ``export`` serialises to StableHLO
(``export.make_deploy_fn``), converts it with jax2onnx (batch dimension symbolic), runs the ONNX file with
onnxruntime against JAX on two probe images, and writes a report. Not meant to be run by hand.

REQUEST.json: ``{"weights": npz, "model": model kwargs, "spec": DeploySpec, "output": file, "opset": int,
"report": json file, "package_dir": the caller's draem_jax folder}``.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import sys
import time
from typing import Any

import flax
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

import draem_jax
from draem_jax import export


def load_variables(path: str) -> dict[str, Any]:
  with np.load(path) as z:
    flat = {k: np.asarray(z[k]) for k in z.files}
  return flax.traverse_util.unflatten_dict(flat, sep="/")


def convert(example, spec: export.DeploySpec, opset: int):
  """jax2onnx ModelProto of ``export.batched(example)``: input ``images`` uint8 (N, H, W, 3), outputs
  ``spec.output_names``.

  jax2onnx converts jaxprs primitive by primitive, but while it traces it also replaces some flax.linen
  functions by primitives of its own (``nn.max_pool``, ``nn.BatchNorm``), which have no batching rule
  and a signature that differs from flax's. So the per-image function is traced to a jaxpr first, by JAX
  alone (no flax code runs under jax2onnx), and jax2onnx converts ``vmap`` of that jaxpr: the same
  primitives that ``jax.export`` serialises.
  """
  from jax2onnx import to_onnx  # pylint: disable=g-import-not-at-top  (export environment only)

  closed = jax.make_jaxpr(example)(jax.ShapeDtypeStruct((*spec.input_size, 3), jnp.uint8))
  per_image = jax.extend.core.jaxpr_as_fun(closed)

  def deploy(images):
    return tuple(jax.vmap(per_image)(images))

  proto = to_onnx(deploy, inputs=[jax.ShapeDtypeStruct(("N", *spec.input_size, 3), jnp.uint8)],
                  model_name="draem", opset=opset, input_names=[export.INPUT_NAME],
                  output_names=list(spec.output_names))
  # jax2onnx annotates some intermediate values with pre-transpose (NHWC vs NCHW) shapes; onnxruntime
  # warns about every one and re-infers them anyway. Inputs and outputs keep their declared shapes.
  del proto.graph.value_info[:]
  return proto


def probe_check(fn, onnx_path: str, spec: export.DeploySpec, names) -> dict[str, Any]:
  """ONNX (onnxruntime, CPU) against JAX on two reproducible random images."""
  import onnxruntime  # pylint: disable=g-import-not-at-top

  images = np.random.default_rng(0).integers(0, 256, (2, *spec.input_size, 3), dtype=np.uint8)
  ref = jax.device_get(jax.jit(fn)(images))
  session = onnxruntime.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
  got = dict(zip(names, session.run(None, {export.INPUT_NAME: images})))
  report = {"images": 2, "max_abs_map_diff": float(np.max(np.abs(got["anomaly_map"] - ref["anomaly_map"]))),
            "max_abs_score_diff": float(np.max(np.abs(got["score"] - ref["score"])))}
  if spec.has_decisions:
    report["decisions_equal"] = bool(np.array_equal(got["decision"], ref["decision"]))
    report["mask_pixels_different"] = int(np.sum(got["mask"] != ref["mask"]))
  report["onnxruntime"] = onnxruntime.__version__
  return report


def run(request: dict[str, Any]) -> dict[str, Any]:
  here = os.path.dirname(os.path.abspath(draem_jax.__file__))
  if os.path.realpath(here) != os.path.realpath(request["package_dir"]):
    raise ValueError(f"the export environment runs draem_jax from {here}, the caller from "
                     f"{request['package_dir']}: run `bash {export.MAKE_EXPORT_VENV}` again in that "
                     "checkout.")
  import onnx  # pylint: disable=g-import-not-at-top

  spec = export.DeploySpec.from_json(request["spec"])
  model = export.build_model(request["model"])
  variables = jax.tree.map(jnp.asarray, load_variables(request["weights"]))
  example = export.make_example_fn(model, variables, spec)
  fn = export.batched(example, spec)
  t0 = time.perf_counter()
  proto = convert(example, spec, int(request["opset"]))
  onnx.checker.check_model(proto)
  with open(request["output"], "wb") as f:
    f.write(proto.SerializeToString())
  t1 = time.perf_counter()
  check = probe_check(fn, request["output"], spec, spec.output_names)
  check["seconds"] = round(time.perf_counter() - t1, 2)
  return {"converter": "jax2onnx", "jax2onnx": importlib.metadata.version("jax2onnx"),
          "onnx": onnx.__version__, "opset": int(request["opset"]), "convert_seconds": round(t1 - t0, 2),
          "export_environment": {"python": sys.executable, "jax": jax.__version__, "flax": flax.__version__},
          "probe_check": check}


def main(argv) -> int:
  if len(argv) != 2:
    print(f"error: usage: python -m draem_jax.export_onnx REQUEST.json (got {argv[1:]})", file=sys.stderr)
    return 2
  with open(argv[1], encoding="utf-8") as f:
    request = json.load(f)
  # jax2onnx's IR library warns about every value it leaves untyped; the checks below judge the file.
  logging.getLogger("onnx_ir").setLevel(logging.ERROR)
  try:
    report = run(request)
  except (ValueError, OSError, ImportError) as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 1
  except Exception as e:  # pylint: disable=broad-except  (a converter failure: one line for the caller)
    text = " ".join(str(e).split())[:500]
    print(f"error: jax2onnx could not convert the model ({type(e).__name__}: {text})", file=sys.stderr)
    return 1
  with open(request["report"], "w", encoding="utf-8") as f:
    json.dump(report, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
