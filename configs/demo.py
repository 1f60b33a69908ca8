r"""Demo: the embedded procedural fabric category, small networks, on a CPU in a few minutes.

Command (the README's first command):

  python -m draem_jax.train --config=configs/demo.py --workdir=workdirs/demo

The data are generated on first use under ``<workdir>/demo_data`` (no download): a woven-fabric texture with
test defects (scratches, holes, stains, misprints) made by generators unrelated to DRAEM's training
synthesis. Anomaly sources are procedural textures (no DTD needed). Recipe: ``draem_jax.recipes.demo``.

Expected result on an idle 2-core CPU: see the README's quick start (metrics in workdirs/demo/eval).
"""

from draem_jax import recipes


def get_config(arg: str | None = None):
  del arg
  return recipes.demo()
