"""draem_jax: DRAEM surface-anomaly detection (Zavrtanik et al., ICCV 2021) in JAX/Flax.

Library modules (pure, jittable functions on NHWC float32 arrays in [0, 1]):

* ``noise``: on-device Perlin noise and anomaly masks.
* ``augment``: the ten anomaly-source augmenters and ``random_augment``.
* ``synthesis``: ``synthesize`` -- masks + augmented textures blended into normal images.
* ``models``: ``ReconstructiveSubNetwork``, ``DiscriminativeSubNetwork`` and ``DRAEM`` (flax.linen).
* ``losses``: SSIM, L2, focal and ``draem_loss``.
* ``scoring``: anomaly maps and the pooled image score.
* ``metrics``: exact image/pixel AUROC, AP, F1-max and AUPRO (NumPy).
* ``steps``: train state, optimizer, the train step and inference.

Programs: ``python -m draem_jax.train | evaluate | predict | convert | summary | benchmark``.
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
