"""Published facts the package relies on: the MVTec AD categories and sizes, and DRAEM's results.

The one home of these numbers; the configs, the tfds builder, the converter, the evaluation report, the
summary and the launchers read them from here.

* ``CATEGORIES`` and ``TRAIN_IMAGES``: the 15 MVTec AD categories and their number of defect-free
  training images (Bergmann et al., "MVTec AD", CVPR 2019, Table 1; 3,629 in total).
* ``PAPER``: DRAEM's per-category results in percent (DRAEM paper, Table 1 for image AUROC, Table 2 for
  pixel AUROC and pixel AP), ``PAPER_MEAN`` their published means.
* ``RELEASED_CHECKPOINTS_MEAN``: the means that the README of the original repository (VitjanZ/DRAEM)
  gives for its released weights.

Pure Python, no imports: shell scripts read it with ``python -m draem_jax.published``.
"""

TEXTURES = ("carpet", "grid", "leather", "tile", "wood")
OBJECTS = ("bottle", "cable", "capsule", "hazelnut", "metal_nut", "pill", "screw", "toothbrush",
           "transistor", "zipper")
CATEGORIES = tuple(sorted(TEXTURES + OBJECTS))

TRAIN_IMAGES = {  # category: defect-free training images (train/good)
    "bottle": 209, "cable": 224, "capsule": 219, "carpet": 280, "grid": 264, "hazelnut": 391,
    "leather": 245, "metal_nut": 220, "pill": 267, "screw": 320, "tile": 230, "toothbrush": 60,
    "transistor": 213, "wood": 247, "zipper": 240,
}

PAPER = {  # category: (image AUROC, pixel AUROC, pixel AP)
    "carpet": (97.0, 95.5, 53.5),
    "grid": (99.9, 99.7, 65.7),
    "leather": (100.0, 98.6, 75.3),
    "tile": (99.6, 99.2, 92.3),
    "wood": (99.1, 96.4, 77.7),
    "bottle": (99.2, 99.1, 86.5),
    "cable": (91.8, 94.7, 52.4),
    "capsule": (98.5, 94.3, 49.4),
    "hazelnut": (100.0, 99.7, 92.9),
    "metal_nut": (98.7, 99.5, 96.3),
    "pill": (98.9, 97.6, 48.5),
    "screw": (93.9, 97.6, 58.2),
    "toothbrush": (100.0, 98.1, 44.7),
    "transistor": (93.1, 90.9, 50.7),
    "zipper": (100.0, 98.8, 81.5),
}
PAPER_MEAN = (98.0, 97.3, 68.4)
RELEASED_CHECKPOINTS_MEAN = (98.1, 97.5, 68.9)


if __name__ == "__main__":
  # For the launchers: the category names, one line, space separated.
  print(" ".join(CATEGORIES))
