r"""DRAEM on one MVTec AD category: the original code's recipe (REFERENCE.md 5).

Command (one category; any of the 15, default bottle):

  python -m draem_jax.train --config=configs/mvtec.py:bottle --workdir=workdirs/mvtec/bottle \
      --config.data_dir=/data/mvtec_anomaly_detection --config.anomaly_source_path=/data/dtd/images

The argument after ':' is the category, optionally followed by ',paper' for the paper's variant
(texture weight beta in [0.1, 1], normal-image rotation +-45 deg, lr x0.1 at epochs 400 and 600):
``--config=configs/mvtec.py:bottle,paper``. Every field can be overridden, e.g. ``--config.batch_size=16``.

Recipe: 256x256 images, global batch 8, Adam 1e-4 on both nets, 700 epochs counted in steps
(ceil(N_train / 8) per epoch), lr x0.2 at 80% and 90% of the epochs, widths 128 / 64, float32.

Expected result (paper Table 1/2, REFERENCE.md 7.1), bottle: image AUROC 99.2, pixel AUROC 99.1,
pixel AP 86.5; mean over the 15 categories 98.0 / 97.3 / 68.4. A full-size run is ~1.2 TFLOPs per
training image (~174 PFLOPs for bottle): hours on one accelerator, impractical on a CPU.
"""

import ml_collections

CATEGORIES = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
              "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  parts = [p for p in (arg or "bottle").split(",") if p]
  category, variants = parts[0], set(parts[1:])
  unknown = variants - {"paper"}
  if unknown:
    raise ValueError(f"configs/mvtec.py: unknown variant(s) {sorted(unknown)}; known: paper")

  c = ml_collections.ConfigDict()
  c.seed = 0

  # Data.
  c.dataset = "folder"            # "folder": MVTec layout on disk; "tfds": the mvtec_ad builder; "demo"
  c.data_dir = "data/mvtec_anomaly_detection"  # folder root, or tfds manual dir when dataset="tfds"
  c.tfds_data_dir = ""            # where tfds keeps prepared datasets ("" = tfds default)
  c.category = category
  c.image_size = 256
  c.anomaly_source_path = ""      # folder of textures (DTD: dtd/images); "" = procedural fallback
  c.max_sources = 0               # 0 = all; otherwise a deterministic subsample (memory)
  c.mask_rule = "reference"       # eval mask resize: "reference" (bilinear, ==255) or "nearest"
  c.channel_order = "rgb"         # "bgr" for weights trained on OpenCV images (released checkpoints)

  # Anomaly synthesis.
  c.synthesis = ml_collections.ConfigDict()
  c.synthesis.variant = "paper" if "paper" in variants else "original"

  # Model.
  c.model = ml_collections.ConfigDict()
  c.model.recon_width = 128
  c.model.disc_width = 64
  c.model.dtype = "float32"       # "bfloat16": bf16 compute, f32 params
  c.model.fast_cpu_conv = False   # CPU only: 5-15% faster steps, ~2.3x activation memory (conv.py)

  # Optimisation.
  c.batch_size = 8                # global, over all devices of all processes
  c.num_epochs = 700
  c.learning_rate = 1e-4
  c.lr_schedule = "paper" if "paper" in variants else "original"
  # original: x0.2 at 80% and 90% of num_epochs. paper: x0.1 at epochs 400 and 600.

  # Bookkeeping.
  c.log_every_steps = 50
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.overwrite = False             # True: set a finished run aside (renamed, never deleted) and retrain
  c.stop_after_steps = 0          # >0: checkpoint and stop after this many steps of this invocation
                                  # (time-limited jobs); rerunning the command resumes.

  # Evaluation.
  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 8
  c.eval.num_visualizations = 16
  c.eval.score_filter_size = 21
  c.eval.aupro_fpr_limit = 0.3
  return c
