"""draem_jax: DRAEM surface-anomaly detection (Zavrtanik et al., ICCV 2021) in JAX/Flax.

``import draem_jax`` gives the core library (pure, jittable functions on NHWC arrays; images float32 in
[0, 1]):

* ``noise``: Perlin noise and anomaly masks, on device.
* ``augment``: the ten anomaly-source augmenters and ``random_augment``.
* ``synthesis``: ``synthesize`` -- masks and augmented textures blended into normal images.
* ``models``: ``ReconstructiveSubNetwork``, ``DiscriminativeSubNetwork`` and ``DRAEM`` (flax.linen).
* ``losses``: SSIM, L2, focal and ``draem_loss``.
* ``scoring``: anomaly maps and the mean-filtered image score.
* ``metrics``: exact image/pixel AUROC, AP, F1-max and AUPRO (NumPy, host side).

Training (``steps``, ``train``), data (``draem_jax.data``), the run directory (``rundir``,
``checkpointing``), evaluation and prediction live in their own modules; docs/architecture.md maps them
all. Programs: ``python -m draem_jax.train | evaluate | predict | convert | summary``.
"""

from draem_jax import augment
from draem_jax import losses
from draem_jax import metrics
from draem_jax import models
from draem_jax import noise
from draem_jax import scoring
from draem_jax import synthesis

__version__ = "0.1.0"

__all__ = ["augment", "losses", "metrics", "models", "noise", "scoring", "synthesis", "__version__"]
