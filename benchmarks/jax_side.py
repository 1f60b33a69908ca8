"""draem_jax's side: the library's state init and jitted train step, FLOPs from the traced model."""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import harness
from draem_jax import conv
from draem_jax import models
from draem_jax import parallel
from draem_jax import steps
from draem_jax import synthesis

# Dense bf16 matrix peak per device (TFLOP/s, vendor data sheets), matched against the device kind; float32
# MFU is reported against the same bf16 peak (what the hardware could do), and says so.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0, "TPU v4": 275.0,
                    "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v6": 918.0}


def peak_tflops(override: float = 0.0) -> tuple[float | None, str]:
  """(peak, where it came from) for the first device."""
  if override > 0:
    return override, "config.accelerator.peak_tflops"
  kind = jax.devices()[0].device_kind
  for name, value in PEAK_BF16_TFLOPS.items():
    if name.lower() in kind.lower():
      return value, f"bf16 dense peak of {name} (data sheet)"
  return None, f"no peak known for device kind {kind!r}; set config.accelerator.peak_tflops"


def conv_layer_shapes(model: models.DRAEM, batch: int, size: int) -> list[tuple[tuple[int, ...], int]]:
  """(input shape, Cout) of every 3x3 conv the model applies, recorded while tracing it (no compute)."""
  shapes = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, conv.Conv3x3) and context.method_name == "__call__":
      shapes.append((tuple(args[0].shape), context.module.features))
    return next_fun(*args, **kwargs)

  x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
  variables = jax.eval_shape(lambda v: model.init(jax.random.key(0), v, train=False), x)
  with models.nn.intercept_methods(record):
    jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
  return shapes


def train_flops_per_image(model: models.DRAEM, size: int) -> float:
  """3 x forward conv FLOPs per image (forward, input gradient, weight gradient) of the traced model."""
  macs = sum(int(np.prod(shape[1:3])) * 9 * shape[3] * cout
             for shape, cout in conv_layer_shapes(model, 1, size))
  return 3.0 * 2.0 * macs


def make_mesh(num_devices: int) -> jax.sharding.Mesh:
  return parallel.make_mesh(jax.devices()[:num_devices])


class TrainBench:
  """The library's state, jitted step and on-device inputs for one train-step row."""

  def __init__(self, config, *, size: int, recon_width: int, disc_width: int, batch: int, num_devices: int,
               dtype: str = "float32"):
    self.mesh = make_mesh(num_devices)
    repl = parallel.replicated(self.mesh)
    self.batch = batch
    self.model = models.DRAEM(recon_width=recon_width, disc_width=disc_width,
                              dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
    schedule = optax.constant_schedule(1e-4)
    tx = steps.make_optimizer(schedule)
    init = jax.jit(lambda key: steps.create_train_state(self.model, tx, key, (size, size)),
                   out_shardings=repl)
    t0 = time.perf_counter()
    self.state = jax.block_until_ready(init(jax.random.key(0)))
    self.init_s = time.perf_counter() - t0
    self.step_fn = steps.jit_train_step(self.mesh, model=self.model, tx=tx,
                                        synthesis_config=synthesis.SynthesisConfig(), schedule=schedule,
                                        batch_size=batch, data_seed=0)
    # The training set is the batch itself (every step draws all of it), as uint8 on the devices.
    self.images = parallel.replicate(harness.normal_images(batch, size), self.mesh)
    self.sources = parallel.replicate(harness.textures(config, size), self.mesh)
    t0 = time.perf_counter()
    self.compiled = self.step_fn.lower(self.state, self.images, self.sources).compile()
    self.compile_s = time.perf_counter() - t0

  def xla_flops(self) -> float | None:
    cost = self.compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0)) or None

  def memory_analysis(self) -> dict[str, Any]:
    try:
      m = self.compiled.memory_analysis()
      return {"temp_mb": m.temp_size_in_bytes / 2**20, "argument_mb": m.argument_size_in_bytes / 2**20}
    except Exception:  # pylint: disable=broad-except
      return {}

  def __call__(self) -> None:
    self.state, metrics = self.compiled(self.state, self.images, self.sources)
    jax.block_until_ready(metrics["loss"])
