r"""DRAEM on one MVTec AD category: the original code's recipe (``draem_jax.recipes.mvtec``).

Command (one category; any of the 15, default bottle):

  python -m draem_jax.train --config=configs/mvtec.py:bottle --workdir=workdirs/mvtec/bottle \
      --config.data_dir=/data/mvtec_anomaly_detection --config.anomaly_source_path=/data/dtd/images

The argument after ':' is the category, optionally followed by ',paper' for the paper's variant
(texture weight beta in [0.1, 1], normal-image rotation +-45 deg, lr x0.1 at epochs 400 and 600):
``--config=configs/mvtec.py:bottle,paper``. ``,fast`` (docs/recipe.md) does not rotate the normal
images, never leaves an anomalous example without an anomaly and weights normal pixels 0.1 in the focal
loss; it combines with ``,paper``. Every field can be overridden, e.g. ``--config.batch_size=16``.

Expected for ``,fast`` at a short budget only (64 px, widths 32/16, 100 steps at a constant lr 1e-4, two
PIPED categories x 2 seeds, docs/recipe.md): pixel AP 77.8 +- 3.3 vs the original recipe's 18.0 +- 4.0
and anomalib's 52.7 +- 0.1; AUPRO 91.1 +- 1.6 vs 61.9 +- 7.0 and 82.6 +- 2.1; image AUROC 93.2 +- 9.6
vs 89.8 +- 4.4 and 99.8 +- 0.2. On four PIPED categories x 3 seeds: pixel AP 72.0 +- 21.2 vs
anomalib's 59.8 +- 4.7, AUPRO 87.7 +- 3.5 vs 81.7 +- 2.2, with one seed of three below anomalib on
pixel AP.

Recipe: 256x256 images, global batch 8, Adam 1e-4 on both nets, 700 epochs counted in steps
(ceil(N_train / 8) per epoch), lr x0.2 at 80% and 90% of the epochs, widths 128 / 64, float32.

Expected result (DRAEM paper, Tables 1 and 2), bottle: image AUROC 99.2, pixel AUROC 99.1,
pixel AP 86.5; mean over the 15 categories 98.0 / 97.3 / 68.4. A full-size run is ~1.2 TFLOPs per
training image (~174 PFLOPs for bottle): hours on one accelerator, impractical on a CPU.
"""

from draem_jax import recipes


def get_config(arg: str | None = None):
  return recipes.from_argument(arg)
