"""anomalib's DRAEM pieces (the ``bench`` extra): its generator, networks, loss, and a hand train step.

The same work as anomalib's ``Draem.training_step``: ``PerlinAnomalyGenerator`` on the batch,
``DraemModel`` (both sub-networks), ``DraemLoss``, then ``torch.optim.Adam`` (lr 1e-4). Its Lightning
``Engine`` adds loggers, callbacks and a datamodule without changing what is measured.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass
class Anomalib:
  """anomalib's classes, or why they are missing."""
  available: bool
  reason: str = ""
  version: str = ""
  torch: Any = None
  generator_cls: Any = None
  model_cls: Any = None
  recon_cls: Any = None
  disc_cls: Any = None
  loss_cls: Any = None

  def to_torch(self, images: np.ndarray):
    """uint8 NHWC -> float NCHW in [0, 1]."""
    return self.torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).float() / 255.0

  def model(self, recon_width: int, disc_width: int):
    """DraemModel with the given widths (its constructor fixes 128 / 64, so the sub-networks are replaced)."""
    model = self.model_cls()
    model.reconstructive_subnetwork = self.recon_cls(in_channels=3, out_channels=3, base_width=recon_width)
    model.discriminative_subnetwork = self.disc_cls(in_channels=6, out_channels=2, base_width=disc_width)
    return model

  def generator(self, texture_dir: str):
    return self.generator_cls(anomaly_source_path=texture_dir, probability=0.5)

  def trainer(self, recon_width: int, disc_width: int, texture_dir: str, learning_rate: float = 1e-4,
              generator=None, focal=None):
    """(model, step): ``step(x)`` trains once on a float NCHW batch, as Draem.training_step + Adam.

    ``generator``: ``x -> (augmented, mask)`` (NCHW, mask (B, 1, H, W)) in place of anomalib's own;
    ``focal``: ``(logits NCHW, target (B, H, W) int64) -> loss`` in place of DraemLoss's focal term.
    """
    torch = self.torch
    model = self.model(recon_width, disc_width).train()
    loss_fn = self.loss_cls()
    if focal is not None:  # DraemLoss.forward with the focal term replaced
      draem = loss_fn
      loss_fn = lambda x, recon, mask, pred: (draem.l2_loss(recon, x) + 2 * draem.ssim_loss(recon, x)  # noqa: E731
                                              + focal(pred, mask.squeeze(1).long()))
    gen = generator or self.generator(texture_dir)
    opt = torch.optim.Adam(model.parameters(), lr=learning_rate)

    def step(x):
      augmented, mask = gen(x)
      recon, prediction = model(augmented)
      loss = loss_fn(x, recon, mask, prediction)
      opt.zero_grad()
      loss.backward()
      opt.step()
    return model, step

  def train_step(self, images: np.ndarray, recon_width: int, disc_width: int, texture_dir: str):
    """A callable doing one training step on the fixed batch ``images`` (uint8 NHWC)."""
    _, step = self.trainer(recon_width, disc_width, texture_dir)
    x = self.to_torch(images)
    return lambda: step(x)


def load(enabled: bool, threads: int) -> Anomalib:
  """Imports anomalib's DRAEM parts if installed and sets torch's thread count."""
  if not enabled:
    return Anomalib(False, "anomalib disabled (config.anomalib=False)")
  try:
    import anomalib  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
    from anomalib.data.utils.generators import perlin  # pylint: disable=g-import-not-at-top
    from anomalib.models.image.draem import loss as draem_loss  # pylint: disable=g-import-not-at-top
    from anomalib.models.image.draem import torch_model  # pylint: disable=g-import-not-at-top
  except Exception as e:  # pylint: disable=broad-except  # ImportError, or a broken torch/torchvision pair
    return Anomalib(False, f"anomalib not importable ({type(e).__name__}: {e}); install the 'bench' extra "
                           "in its own virtualenv (BENCHMARKS.md) to compare")
  torch.set_num_threads(threads)
  return Anomalib(True, version=f"anomalib {anomalib.__version__}, torch {torch.__version__}", torch=torch,
                  generator_cls=perlin.PerlinAnomalyGenerator, model_cls=torch_model.DraemModel,
                  recon_cls=torch_model.ReconstructiveSubNetwork,
                  disc_cls=torch_model.DiscriminativeSubNetwork, loss_cls=draem_loss.DraemLoss)
