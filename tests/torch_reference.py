"""PyTorch transcription of DRAEM's two networks (VitjanZ/DRAEM model_unet.py), for converter tests only.

Written from the specification, not from the original code. Attribute names and ``nn.Sequential``
indices reproduce the original state_dict keys (docs/architecture.md): ``encoder.block1.{0,1,3,4}``,
``decoder.up1.{1,2}``, ``decoder.db1.{0,1,3,4}``, ``decoder.fin_out.0``; ``encoder_segment.*``,
``decoder_segment.{up_b, db_b, up1..4, db1..4, fin_out.0}``. Importing this module requires torch.
"""

import torch
from torch import nn


def double_conv(cin: int, mid: int, cout: int) -> nn.Sequential:
  # Indices 0 conv, 1 BN, 2 ReLU, 3 conv, 4 BN, 5 ReLU.
  return nn.Sequential(
      nn.Conv2d(cin, mid, 3, padding=1), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
      nn.Conv2d(mid, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def up_block(cin: int, cout: int) -> nn.Sequential:
  # Indices 0 Upsample, 1 conv, 2 BN, 3 ReLU: upsampling comes before the conv.
  return nn.Sequential(
      nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
      nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def out_conv(cin: int, cout: int) -> nn.Sequential:
  return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1))


class ReconEncoder(nn.Module):

  def __init__(self, cin: int, w: int):
    super().__init__()
    self.block1 = double_conv(cin, w, w)
    self.mp1 = nn.MaxPool2d(2)
    self.block2 = double_conv(w, 2 * w, 2 * w)
    self.mp2 = nn.MaxPool2d(2)
    self.block3 = double_conv(2 * w, 4 * w, 4 * w)
    self.mp3 = nn.MaxPool2d(2)
    self.block4 = double_conv(4 * w, 8 * w, 8 * w)
    self.mp4 = nn.MaxPool2d(2)
    self.block5 = double_conv(8 * w, 8 * w, 8 * w)

  def forward(self, x):
    x = self.mp1(self.block1(x))
    x = self.mp2(self.block2(x))
    x = self.mp3(self.block3(x))
    x = self.mp4(self.block4(x))
    return self.block5(x)


class ReconDecoder(nn.Module):

  def __init__(self, w: int, cout: int):
    super().__init__()
    self.up1 = up_block(8 * w, 8 * w)
    self.db1 = double_conv(8 * w, 8 * w, 4 * w)
    self.up2 = up_block(4 * w, 4 * w)
    self.db2 = double_conv(4 * w, 4 * w, 2 * w)
    self.up3 = up_block(2 * w, 2 * w)
    self.db3 = double_conv(2 * w, 2 * w, w)
    self.up4 = up_block(w, w)
    self.db4 = double_conv(w, w, w)
    self.fin_out = out_conv(w, cout)

  def forward(self, x):
    for k in range(1, 5):
      x = getattr(self, f"db{k}")(getattr(self, f"up{k}")(x))
    return self.fin_out(x)


class ReconstructiveSubNetwork(nn.Module):
  """Autoencoder without skips: 3 -> 3 channels, H and W divisible by 16."""

  def __init__(self, in_channels: int = 3, out_channels: int = 3, base_width: int = 128):
    super().__init__()
    self.encoder = ReconEncoder(in_channels, base_width)
    self.decoder = ReconDecoder(base_width, out_channels)

  def forward(self, x):
    return self.decoder(self.encoder(x))


class DiscEncoder(nn.Module):

  def __init__(self, cin: int, w: int):
    super().__init__()
    self.block1 = double_conv(cin, w, w)
    self.block2 = double_conv(w, 2 * w, 2 * w)
    self.block3 = double_conv(2 * w, 4 * w, 4 * w)
    self.block4 = double_conv(4 * w, 8 * w, 8 * w)
    self.block5 = double_conv(8 * w, 8 * w, 8 * w)
    self.block6 = double_conv(8 * w, 8 * w, 8 * w)
    for k in range(1, 6):
      setattr(self, f"mp{k}", nn.MaxPool2d(2))

  def forward(self, x):
    feats = [self.block1(x)]
    for k in range(2, 7):
      feats.append(getattr(self, f"block{k}")(getattr(self, f"mp{k - 1}")(feats[-1])))
    return feats


class DiscDecoder(nn.Module):

  def __init__(self, w: int, cout: int):
    super().__init__()
    self.up_b = up_block(8 * w, 8 * w)
    self.db_b = double_conv(16 * w, 8 * w, 8 * w)
    self.up1 = up_block(8 * w, 4 * w)
    self.db1 = double_conv(12 * w, 4 * w, 4 * w)
    self.up2 = up_block(4 * w, 2 * w)
    self.db2 = double_conv(6 * w, 2 * w, 2 * w)
    self.up3 = up_block(2 * w, w)
    self.db3 = double_conv(3 * w, w, w)
    self.up4 = up_block(w, w)
    self.db4 = double_conv(2 * w, w, w)
    self.fin_out = out_conv(w, cout)

  def forward(self, feats):
    b1, b2, b3, b4, b5, x = feats
    for level, skip in (("_b", b5), ("1", b4), ("2", b3), ("3", b2), ("4", b1)):
      up = getattr(self, f"up{level}")(x)
      x = getattr(self, f"db{level}")(torch.cat([up, skip], dim=1))  # [up-output, skip]
    return self.fin_out(x)


class DiscriminativeSubNetwork(nn.Module):
  """U-Net with 6 levels: 6 -> 2 channels, H and W divisible by 32."""

  def __init__(self, in_channels: int = 6, out_channels: int = 2, base_channels: int = 64):
    super().__init__()
    self.encoder_segment = DiscEncoder(in_channels, base_channels)
    self.decoder_segment = DiscDecoder(base_channels, out_channels)

  def forward(self, x):
    return self.decoder_segment(self.encoder_segment(x))


def draem_forward(recon_net: nn.Module, disc_net: nn.Module, x: torch.Tensor, *, image_first=False):
  """Original test-time forward: (reconstruction, logits); discriminator input [recon, x] by default."""
  recon = recon_net(x)
  pair = [x, recon] if image_first else [recon, x]
  return recon, disc_net(torch.cat(pair, dim=1))


class AnomalibDraemModel(nn.Module):
  """anomalib's ``DraemModel`` layout: same nets under reconstructive_/discriminative_subnetwork."""

  def __init__(self, recon_width: int = 128, disc_width: int = 64):
    super().__init__()
    self.reconstructive_subnetwork = ReconstructiveSubNetwork(base_width=recon_width)
    self.discriminative_subnetwork = DiscriminativeSubNetwork(base_channels=disc_width)

  def forward(self, x):
    # anomalib feeds the discriminator [image, reconstruction] (docs/paper_vs_code.md).
    return draem_forward(self.reconstructive_subnetwork, self.discriminative_subnetwork, x,
                         image_first=True)
