"""Published DRAEM results on MVTec AD, for side-by-side reports (percent).

Paper (ICCV 2021) Table 1 (image AUROC) and Table 2 (pixel AUROC / pixel AP); see REFERENCE.md 7.1.
The released checkpoints give means of 98.1 / 97.5 / 68.9 (README of the original code).
"""

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
