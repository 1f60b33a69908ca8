r"""Demo: the embedded procedural fabric category, small networks, on a CPU in a few minutes.

Command (the README's first command):

  python -m draem_jax.train --config=configs/demo.py --workdir=workdirs/demo

The data are generated on first use under ``<workdir>/demo_data`` (no download): a woven-fabric texture with
test defects (scratches, holes, stains, misprints) made by generators unrelated to DRAEM's training
synthesis. Anomaly sources are procedural textures (no DTD needed).

Expected result on a 2-core CPU: see README "Demo" (metrics.json in workdirs/demo/eval).
"""

import importlib.util
import os

# Load the sibling config by path: config files are loaded by file name, not as a package.
_spec = importlib.util.spec_from_file_location(
    "draem_configs_mvtec", os.path.join(os.path.dirname(os.path.abspath(__file__)), "mvtec.py"))
mvtec = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mvtec)


def get_config(arg: str | None = None):
  del arg
  c = mvtec.get_config("demo_fabric")
  c.dataset = "demo"
  c.data_dir = ""                  # "" = <workdir>/demo_data
  c.image_size = 64
  c.model.recon_width = 16
  c.model.disc_width = 16
  c.batch_size = 8
  c.num_epochs = 40
  c.learning_rate = 1e-3
  c.log_every_steps = 20
  c.checkpoint_every_steps = 100
  c.eval.num_visualizations = 8
  return c
