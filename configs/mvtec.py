r"""DRAEM on one MVTec AD category: the original code's recipe (``draem_jax.recipes.mvtec``).

Command (one category; any of the 15, default bottle):

  python -m draem_jax.train --config=configs/mvtec.py:bottle --workdir=workdirs/mvtec/bottle \
      --config.data_dir=/data/mvtec_anomaly_detection --config.anomaly_source_path=/data/dtd/images

The argument after ':' is the category, optionally followed by ',paper' for the paper's variant
(texture weight beta in [0.1, 1], normal-image rotation +-45 deg, lr x0.1 at epochs 400 and 600):
``--config=configs/mvtec.py:bottle,paper``. ``,fast`` (docs/recipe.md) does not rotate the normal
images, never leaves an anomalous example without an anomaly, weights normal pixels 0.05 in the focal
loss and makes an EMA of the weights (decay 0.9) the model; it combines with ``,paper``. Every field can
be overridden, e.g. ``--config.batch_size=16``.

Expected for ``,fast`` at a short budget only (64 px, widths 32/16, 100 steps at a constant lr 1e-4, four
PIPED categories x 5 seeds, docs/recipe.md): image AUROC 99.9 +- 0.1, pixel AP 76.8 +- 6.4, AUPRO
90.1 +- 1.9, against anomalib's 100.0 +- 0.1, 58.8 +- 7.5 and 82.3 +- 3.7 (ahead on pixel AP for every
seed); on the four x seeds 0-1 the original recipe has 88.3 / 19.4 / 60.2 (fast 100.0 / 77.0 / 89.3).
No expected numbers for full-size runs.

Recipe: 256x256 images, global batch 8, Adam 1e-4 on both nets, 700 epochs counted in steps
(ceil(N_train / 8) per epoch), lr x0.2 at 80% and 90% of the epochs, widths 128 / 64, float32.

Expected result (DRAEM paper, Tables 1 and 2), bottle: image AUROC 99.2, pixel AUROC 99.1,
pixel AP 86.5; mean over the 15 categories 98.0 / 97.3 / 68.4. A full-size run is ~1.2 TFLOPs per
training image (~174 PFLOPs for bottle): hours on one accelerator, impractical on a CPU.
"""

from draem_jax import recipes


def get_config(arg: str | None = None):
  return recipes.from_argument(arg)
