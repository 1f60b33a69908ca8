r"""Measures this CPU's table of ``draem_jax.conv.CPU_WEIGHT_GRAD_TABLES`` again on the machine at hand.

For every 3x3 conv layer of DRAEM at the given image size and widths (shapes recorded while tracing the
model), times forward + backward of that one convolution with each weight-gradient method ("native",
"taps", "im2col"), calls interleaved, and prints the medians and a table in the source's format:

  python -m benchmarks.conv_table                                  # widths 16/16 at 128 px, batch 8
  python -m benchmarks.conv_table --size=64 --widths=128,64 --repeats=5

Paste the printed entries into that table (``conv.cpu_table_name()`` says which) when they disagree with it.
Run it on an idle machine: the winners differ by tens of per cent, which a busy core hides.
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags

_SIZE = flags.DEFINE_integer("size", 128, "Training image size (pixels).")
_WIDTHS = flags.DEFINE_list("widths", ["16", "16"], "Reconstructive and discriminative base widths.")
_BATCH = flags.DEFINE_integer("batch", 8, "Batch size of the training step the layers come from.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per method (medians reported).")
_THREADS = flags.DEFINE_integer("threads", 0, "Cores (0 = all usable); one host device.")


def measure(size: int, recon_width: int, disc_width: int, batch: int, repeats: int) -> list[dict]:
  """Per distinct layer shape: the median seconds of each method and the fastest one."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from benchmarks import harness  # pylint: disable=g-import-not-at-top
  from benchmarks import jax_side  # pylint: disable=g-import-not-at-top
  from draem_jax import conv  # pylint: disable=g-import-not-at-top
  from draem_jax import models  # pylint: disable=g-import-not-at-top

  model = models.DRAEM(recon_width=recon_width, disc_width=disc_width)
  shapes = sorted(set(jax_side.conv_layer_shapes(model, batch, size)), reverse=True)
  rows = []
  for shape, cout in shapes:
    key_x, key_k, key_dy = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(key_x, shape, jnp.float32)
    kernel = 0.02 * jax.random.normal(key_k, (3, 3, shape[3], cout), jnp.float32)
    dy = jax.random.normal(key_dy, (*shape[:3], cout), jnp.float32)
    fns = {}
    for method in conv.WEIGHT_GRAD_METHODS:
      def loss(x, kernel, dy, method=method):
        return jnp.vdot(conv.conv3x3(x, kernel, weight_grad=method), dy)
      grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
      jax.block_until_ready(grad(x, kernel, dy))
      fns[method] = lambda grad=grad, args=(x, kernel, dy): jax.block_until_ready(grad(*args))
    t = harness.interleaved(fns, repeats, 1)
    medians = {m: t[m]["median_s"] for m in fns}
    rows.append({"rows": int(shape[0] * shape[1] * shape[2]), "cin": int(shape[3]), "cout": int(cout),
                 "median_s": medians, "fastest": min(medians, key=medians.get),
                 "table": conv.cpu_weight_grad_method(shape[0] * shape[1] * shape[2], shape[3], cout)})
  return rows


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  widths = [int(w) for w in _WIDTHS.value]
  if len(widths) != 2 or _SIZE.value % 32 or min(widths) < 1:
    raise SystemExit("error: --widths takes two positive integers and --size a multiple of 32")
  from benchmarks import harness  # pylint: disable=g-import-not-at-top
  from draem_jax import conv as conv_lib  # pylint: disable=g-import-not-at-top
  harness.configure_process(_THREADS.value, 1)
  rows = measure(_SIZE.value, *widths, _BATCH.value, _REPEATS.value)
  print(f"load average {os.getloadavg()}; fwd+bwd of one conv, ms (median of {_REPEATS.value}); "
        f"table {conv_lib.cpu_table_name()!r}")
  print("| rows | Cin | Cout | " + " | ".join(rows[0]["median_s"]) + " | fastest | table says |")
  print("|---|---|---|" + "---|" * len(rows[0]["median_s"]) + "---|---|")
  for r in rows:
    print(f"| {r['rows']} | {r['cin']} | {r['cout']} | "
          + " | ".join(f"{1e3 * s:.2f}" for s in r["median_s"].values())
          + f" | {r['fastest']} | {r['table']} |")
  print("\nTable entries:")
  print(", ".join(f"(({r['rows']}, {r['cin']}, {r['cout']}), \"{r['fastest']}\")" for r in rows))


if __name__ == "__main__":
  sys.exit(app.run(main))
