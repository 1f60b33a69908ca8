"""DRAEM's two networks (docs/architecture.md; VitjanZ/DRAEM model_unet.py) in flax.linen, NHWC.

``ReconstructiveSubNetwork`` is a plain encoder-decoder (no skips, 23 convs, 22 BNs);
``DiscriminativeSubNetwork`` a 6-level U-Net with [up, skip] concatenation (28 convs, 27 BNs); ``DRAEM``
chains them: the discriminator sees the channel concat [reconstruction, image]. Every conv is 3x3 SAME with
bias (``conv.Conv3x3``), every BN is PyTorch's BatchNorm2d (flax momentum 0.9 = torch 0.1, eps 1e-5), order
Conv -> BN -> ReLU, max-pool 2x2, up blocks = bilinear x2 (align_corners=True) -> Conv -> BN -> ReLU, and
``fin_out`` is a bare conv (no BN, no activation).

Parameter tree vs. PyTorch state_dict. Module names repeat the torch attribute names and
the ``nn.Sequential`` index of each layer, so that a converter is a rename plus a transpose:

  torch key (relative to one sub-network)     flax (collection, path)
  ------------------------------------------  --------------------------------------------------------
  <enc>.blockK.{0,3}.weight  (O, I, 3, 3)     params      <enc>/blockK/conv_{0,3}/kernel  (3, 3, I, O)
  <enc>.blockK.{0,3}.bias                     params      <enc>/blockK/conv_{0,3}/bias
  <enc>.blockK.{1,4}.weight / .bias           params      <enc>/blockK/bn_{1,4}/scale / bias
  <enc>.blockK.{1,4}.running_mean / _var      batch_stats <enc>/blockK/bn_{1,4}/mean / var
  <enc>.blockK.{1,4}.num_batches_tracked      (dropped; flax does not count batches)
  <dec>.dbK.{0,1,3,4}.*                       as blockK:  <dec>/dbK/{conv_0,bn_1,conv_3,bn_4}/...
  <dec>.upK.{1,2}.*  (0 is the Upsample)      <dec>/upK/{conv_1,bn_2}/...
  <dec>.fin_out.0.weight / .bias              params      <dec>/fin_out/conv_0/kernel / bias

  with <enc>, <dec> = encoder, decoder (reconstructive: block1-5, up1-4, db1-4) or encoder_segment,
  decoder_segment (discriminative: block1-6, up_b, db_b, up1-4, db1-4). Conv weights go OIHW -> HWIO with
  ``w.transpose(2, 3, 1, 0)``. In ``DRAEM`` the trees sit under 'reconstructive' and 'discriminative'
  (the original releases them as two files). ``torch_key_to_flax`` implements this table.

Fidelity notes: flax stores the biased batch variance in the running estimate, PyTorch the unbiased one
(n / (n - 1), negligible at batch x H x W >= 32k). ``dtype=jnp.bfloat16`` computes in bfloat16 with float32
parameters, float32 BN statistics and float32 outputs.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from draem_jax import batchnorm
from draem_jax import conv as conv_lib

# flax momentum is the weight of the *old* running value: 0.9 here = PyTorch momentum 0.1.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5
ModuleDef = Any


def _bn_scale_init(key, shape, dtype=jnp.float32):
  # DRAEM's weights_init (train_DRAEM.py L14-20): BN gamma ~ N(1, 0.02).
  return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


@functools.lru_cache(maxsize=None)
def _align_corners_matrix(n: int) -> np.ndarray:
  """(2n, n) float64 matrix of bilinear x2 interpolation weights with align_corners=True."""
  m = np.zeros((2 * n, n))
  # Output index i samples input coordinate i * (n - 1) / (2n - 1): the corner pixels coincide.
  coord = np.arange(2 * n) * ((n - 1) / max(2 * n - 1, 1))
  lo = np.minimum(np.floor(coord).astype(int), n - 1)
  hi = np.minimum(lo + 1, n - 1)
  frac = coord - lo
  np.add.at(m, (np.arange(2 * n), lo), 1.0 - frac)
  np.add.at(m, (np.arange(2 * n), hi), frac)
  return m


def upsample2x_align_corners(x: jax.Array) -> jax.Array:
  """Bilinear x2 upsampling with align_corners=True (torch ``nn.Upsample(scale_factor=2, ...)``).

  ``jax.image.resize`` samples at half-pixel centres (align_corners=False) and does not match, hence two
  small interpolation matrices, one per spatial axis.

  Args:
    x: (N, H, W, C) float array.

  Returns:
    (N, 2H, 2W, C) array of ``x``'s dtype.
  """
  if x.ndim != 4:
    raise ValueError(f"upsample2x_align_corners: x must be NHWC (4-D), got shape {x.shape}.")
  mh = jnp.asarray(_align_corners_matrix(x.shape[1]), x.dtype)
  mw = jnp.asarray(_align_corners_matrix(x.shape[2]), x.dtype)
  x = jnp.einsum("ph,nhwc->npwc", mh, x)
  return jnp.einsum("qw,npwc->npqc", mw, x)


@jax.custom_vjp
def max_pool2x2(x: jax.Array) -> jax.Array:
  """2x2 max-pool, stride 2 (torch ``nn.MaxPool2d(2)``): (N, H, W, C) -> (N, H/2, W/2, C), H, W even.

  The forward is a reshape and a max over the window axes (the same values as ``nn.max_pool``); the
  backward sends each gradient to the first maximum of its window in row-major order, as PyTorch and
  XLA's select-and-scatter do, but as a few comparisons among the window's four values: XLA:CPU's
  select-and-scatter costs 4-6x more (8x128x128x16: 88 ms vs 24 ms forward + backward), and autodiff of
  the max (equality with the maximum, divided by the tie count) is not robust to XLA recomputing the
  input with other rounding (a window with no equal element divides by zero).
  """
  return _max_pool_fwd(x)[0]


def _windows(x: jax.Array) -> jax.Array:
  n, h, w, c = x.shape
  return x.reshape(n, h // 2, 2, w // 2, 2, c)


def _max_pool_fwd(x):
  return jnp.max(_windows(x), axis=(2, 4)), x


def _max_pool_bwd(x, g):
  win = _windows(x)
  a, b, c, d = win[:, :, 0, :, 0], win[:, :, 0, :, 1], win[:, :, 1, :, 0], win[:, :, 1, :, 1]
  first = (a >= b) & (a >= c) & (a >= d)
  second = ~first & (b >= c) & (b >= d)
  third = ~first & ~second & (c >= d)
  fourth = ~(first | second | third)
  zero = jnp.zeros_like(g)
  rows = [jnp.stack([jnp.where(m0, g, zero), jnp.where(m1, g, zero)], axis=3)
          for m0, m1 in ((first, second), (third, fourth))]
  return (jnp.stack(rows, axis=2).reshape(x.shape),)


max_pool2x2.defvjp(_max_pool_fwd, _max_pool_bwd)


def _check_input(x: jax.Array, multiple: int, what: str) -> None:
  if x.ndim != 4:
    raise ValueError(f"{what}: input must be a batch of NHWC images (N, H, W, C), got shape {x.shape}.")
  h, w = x.shape[1:3]
  if h % multiple or w % multiple:
    raise ValueError(f"{what}: image height and width must be divisible by {multiple} (one factor 2 per "
                     f"max-pool), got input shape {x.shape}; resize or pad the images, e.g. to 256x256.")


# DRAEM's BatchNorm2d: ``batchnorm.BatchNorm`` is flax's with use_fast_variance=False (the default
# E[x^2] - E[x]^2 cancels catastrophically when |mean| >> std, conv outputs with large biases, which made
# gradients depend on the reduction order, i.e. on the device count, by several percent; the two-pass
# variance is what PyTorch computes), with the closed-form training backward.
BatchNorm: ModuleDef = functools.partial(batchnorm.BatchNorm, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                                         param_dtype=jnp.float32, scale_init=_bn_scale_init)


# Initialisation schemes of the conv kernels (and BN scales), ``DRAEM.init_scheme`` (docs/recipe.md):
# * "normal_0.02": the original's weights_init (train_DRAEM.py L14-20): conv kernels N(0, 0.02), BN gamma
#   N(1, 0.02); conv biases keep PyTorch's default U(+-1/sqrt(fan_in)).
# * "pytorch_default": no weights_init, as anomalib: PyTorch's Conv2d default kaiming_uniform(a=sqrt(5)),
#   i.e. U(+-1/sqrt(fan_in)) with fan_in = 9 Cin, the same for biases, and BN gamma = 1.
# * "width_scaled": N(0, 0.02 sqrt(W0 / W)) for every conv of a network of base width W whose original
#   width is W0 (128 reconstructive, 64 discriminative): each layer's fan-in shrinks by W / W0 at a
#   reduced width, and this keeps sqrt(fan_in) * std, the kernel norm per output channel that Adam's
#   fixed-size steps are measured against, at its full-width value. Identical to "normal_0.02" at the
#   original widths. The input conv, whose fan-in does not depend on W, is scaled too (BN follows it).
INITS = ("normal_0.02", "pytorch_default", "width_scaled")
ORIGINAL_WIDTHS = {"reconstructive": 128, "discriminative": 64}


def _ones(key, shape, dtype=jnp.float32):
  del key
  return jnp.ones(shape, dtype)


def init_factories(init: str, conv: ModuleDef, width: int, original_width: int,
                   norm: ModuleDef = BatchNorm) -> tuple[ModuleDef, ModuleDef]:
  """The (conv, norm) factories of one network with its kernel / BN-scale initialisers for ``init``.

  "normal_0.02" returns ``conv`` and ``norm`` untouched (their defaults are the original's); the others
  bind ``kernel_init`` (and ``scale_init``), so ``conv`` must accept it (``conv.Conv3x3`` does).
  """
  if init == "normal_0.02":
    return conv, norm
  if init == "pytorch_default":
    # variance 1 / (3 fan_in) uniform = U(+-1/sqrt(fan_in)) = kaiming_uniform(a=sqrt(5)); fan_in from
    # HWIO is 3 * 3 * Cin, as torch's.
    kernel_init = conv_lib.torch_default_kernel_init
    return functools.partial(conv, kernel_init=kernel_init), functools.partial(norm, scale_init=_ones)
  if init == "width_scaled":
    kernel_init = conv_lib.normal_init(0.02 * float(np.sqrt(original_width / width)))
    return functools.partial(conv, kernel_init=kernel_init), norm
  raise ValueError(f"init must be one of {INITS}, got {init!r}")


def layers(dtype: Any = jnp.float32, conv: ModuleDef = conv_lib.Conv3x3,
           norm: ModuleDef = BatchNorm) -> tuple[ModuleDef, ModuleDef]:
  """The (conv, norm) factories of the blocks, computing in ``dtype`` (parameters stay float32)."""
  return functools.partial(conv, dtype=dtype), functools.partial(norm, dtype=dtype)


def _conv_bn_relu(x, features, index, train, conv, norm):
  # Called inside a compact method: conv and BN become children of that module, named by their torch
  # Sequential indices (conv, BN, ReLU at index, index + 1, index + 2).
  x = conv(features, name=f"conv_{index}")(x)
  x = norm(use_running_average=not train, name=f"bn_{index + 1}")(x)
  return nn.relu(x)


class DoubleConv(nn.Module):
  """torch ``Sequential(conv, BN, ReLU, conv, BN, ReLU)``: children conv_0, bn_1, conv_3, bn_4.

  Attributes:
    mid_features: channels of the first conv.
    features: channels of the second conv (the output).
    conv: conv factory ``conv(features, name=...)`` (``layers``).
    norm: BatchNorm factory ``norm(use_running_average=..., name=...)``.
  """
  mid_features: int
  features: int
  conv: ModuleDef = conv_lib.Conv3x3
  norm: ModuleDef = BatchNorm

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = _conv_bn_relu(x, self.mid_features, 0, train, self.conv, self.norm)
    return _conv_bn_relu(x, self.features, 3, train, self.conv, self.norm)


class UpBlock(nn.Module):
  """torch ``Sequential(Upsample, conv, BN, ReLU)``: (N, H, W, C) -> (N, 2H, 2W, features); conv_1, bn_2."""
  features: int
  conv: ModuleDef = conv_lib.Conv3x3
  norm: ModuleDef = BatchNorm

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = upsample2x_align_corners(x)
    return _conv_bn_relu(x, self.features, 1, train, self.conv, self.norm)


class OutConv(nn.Module):
  """torch ``Sequential(conv)`` (``fin_out``): a bare conv named conv_0, no BN, no activation."""
  features: int
  conv: ModuleDef = conv_lib.Conv3x3

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(self.features, name="conv_0")(x)


class ReconstructiveEncoder(nn.Module):
  """block1..block5 with four max-pools: (N, H, W, C) -> (N, H/16, W/16, 8 * width)."""
  width: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    w, kw = self.width, dict(conv=self.conv, norm=self.norm)
    x = DoubleConv(w, w, name="block1", **kw)(x, train)
    for k, mult in ((2, 2), (3, 4), (4, 8), (5, 8)):
      x = DoubleConv(mult * w, mult * w, name=f"block{k}", **kw)(max_pool2x2(x), train)
    return x


class ReconstructiveDecoder(nn.Module):
  """up1..up4 / db1..db4 without skips, then fin_out: (N, h, w, 8 * width) -> (N, 16h, 16w, out)."""
  width: int
  out_channels: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    w, kw = self.width, dict(conv=self.conv, norm=self.norm)
    # (level, channels of upK and of dbK's first conv, channels out of dbK), in multiples of width.
    for k, mid, out in ((1, 8, 4), (2, 4, 2), (3, 2, 1), (4, 1, 1)):
      x = UpBlock(mid * w, name=f"up{k}", **kw)(x, train)
      x = DoubleConv(mid * w, out * w, name=f"db{k}", **kw)(x, train)
    return OutConv(self.out_channels, conv=self.conv, name="fin_out")(x)


class DiscriminativeEncoder(nn.Module):
  """block1..block6 with five max-pools; returns the six block outputs (skips b1..b6)."""
  width: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, ...]:
    w, kw = self.width, dict(conv=self.conv, norm=self.norm)
    feats = [DoubleConv(w, w, name="block1", **kw)(x, train)]
    for k, mult in ((2, 2), (3, 4), (4, 8), (5, 8), (6, 8)):
      feats.append(DoubleConv(mult * w, mult * w, name=f"block{k}", **kw)(max_pool2x2(feats[-1]), train))
    return tuple(feats)


class DiscriminativeDecoder(nn.Module):
  """up_b/db_b, up1..up4/db1..db4 with [up, skip] concatenation, then fin_out."""
  width: int
  out_channels: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, feats: tuple[jax.Array, ...], train: bool) -> jax.Array:
    w, kw = self.width, dict(conv=self.conv, norm=self.norm)
    b1, b2, b3, b4, b5, x = feats
    for level, mult, skip in (("_b", 8, b5), ("1", 4, b4), ("2", 2, b3), ("3", 1, b2), ("4", 1, b1)):
      x = UpBlock(mult * w, name=f"up{level}", **kw)(x, train)
      # Concat order [up-output, skip] as in the original (matters for converted checkpoints).
      x = jnp.concatenate([x, skip], axis=-1)
      x = DoubleConv(mult * w, mult * w, name=f"db{level}", **kw)(x, train)
    return OutConv(self.out_channels, conv=self.conv, name="fin_out")(x)


class ReconstructiveSubNetwork(nn.Module):
  """DRAEM's reconstructive autoencoder (docs/architecture.md): 69,048,579 params at base_width 128.

  Attributes:
    base_width: channels of the first block (128 in DRAEM).
    out_channels: output channels (3).
    dtype: compute dtype; parameters and BN statistics stay float32 and the output is float32.
    conv: conv module class, called as ``conv(features, dtype=, name=)`` (default ``conv.Conv3x3``).
    init_scheme: initialisation scheme, one of ``INITS`` (default the original's; not ``init``, which
      is flax's ``Module.init``).
  """
  base_width: int = 128
  out_channels: int = 3
  dtype: Any = jnp.float32
  conv: ModuleDef = conv_lib.Conv3x3
  init_scheme: str = "normal_0.02"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Reconstructs the input.

    Args:
      x: (N, H, W, C) float images, H and W divisible by 16.
      train: BN uses batch statistics and updates 'batch_stats' (apply with mutable=['batch_stats']);
        False uses the running statistics.

    Returns:
      (N, H, W, out_channels) float32 reconstruction (unbounded, no output activation).
    """
    _check_input(x, 16, "ReconstructiveSubNetwork")
    conv, norm = layers(self.dtype, *init_factories(self.init_scheme, self.conv, self.base_width,
                                                    ORIGINAL_WIDTHS["reconstructive"]))
    kw = dict(width=self.base_width, conv=conv, norm=norm)
    z = ReconstructiveEncoder(name="encoder", **kw)(x, train)
    y = ReconstructiveDecoder(out_channels=self.out_channels, name="decoder", **kw)(z, train)
    return y.astype(jnp.float32)


class DiscriminativeSubNetwork(nn.Module):
  """DRAEM's discriminative U-Net (docs/architecture.md): 28,374,146 params at base_width 64 with 6 inputs.

  Attributes:
    base_width: channels of the first block (64 in DRAEM).
    out_channels: output channels (2 logits: normal, anomalous).
    dtype: compute dtype; parameters and BN statistics stay float32 and the output is float32.
    conv: conv module class, as in ``ReconstructiveSubNetwork``.
    init_scheme: initialisation scheme, one of ``INITS``.
  """
  base_width: int = 64
  out_channels: int = 2
  dtype: Any = jnp.float32
  conv: ModuleDef = conv_lib.Conv3x3
  init_scheme: str = "normal_0.02"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Segments anomalies.

    Args:
      x: (N, H, W, C) float input (C = 6 in DRAEM), H and W divisible by 32.
      train: BN mode, as in ``ReconstructiveSubNetwork``.

    Returns:
      (N, H, W, out_channels) float32 logits; softmax over the last axis is applied by the caller.
    """
    _check_input(x, 32, "DiscriminativeSubNetwork")
    conv, norm = layers(self.dtype, *init_factories(self.init_scheme, self.conv, self.base_width,
                                                    ORIGINAL_WIDTHS["discriminative"]))
    kw = dict(width=self.base_width, conv=conv, norm=norm)
    feats = DiscriminativeEncoder(name="encoder_segment", **kw)(x, train)
    y = DiscriminativeDecoder(out_channels=self.out_channels, name="decoder_segment", **kw)(feats, train)
    return y.astype(jnp.float32)


DISC_INPUT_ORDERS = ("recon_image", "image_recon")


class DRAEM(nn.Module):
  """Reconstructive + discriminative network, as trained end to end by DRAEM.

  The reconstruction is not stop-gradiented: the discriminator's (focal) loss also trains the
  reconstructive network, as in the original ``train_DRAEM.py``.

  Attributes:
    recon_width: base width of the reconstructive net (128).
    disc_width: base width of the discriminative net (64).
    dtype: compute dtype (float32 or bfloat16); params, BN statistics and outputs are float32.
    disc_input_order: "recon_image" (original DRAEM and its released checkpoints) feeds the discriminator
      [reconstruction, image]; "image_recon" feeds [image, reconstruction] (anomalib's order; the
      converter instead swaps the first discriminator conv's input channels, so converted anomalib
      weights run with the default).
    conv: conv module class of both nets (default ``conv.Conv3x3``; its CPU backward is chosen per layer
      shape, see ``conv.py``).
    init_scheme: initialisation scheme of both nets, one of ``INITS`` (default "normal_0.02", the
      original's; ``config.model.init``).
  """
  recon_width: int = 128
  disc_width: int = 64
  dtype: Any = jnp.float32
  disc_input_order: str = "recon_image"
  conv: ModuleDef = conv_lib.Conv3x3
  init_scheme: str = "normal_0.02"

  def setup(self):
    if self.disc_input_order not in DISC_INPUT_ORDERS:
      raise ValueError(f"DRAEM.disc_input_order must be one of {DISC_INPUT_ORDERS}, got "
                       f"{self.disc_input_order!r}.")
    if self.init_scheme not in INITS:
      raise ValueError(f"DRAEM.init_scheme must be one of {INITS}, got {self.init_scheme!r}.")
    kw = dict(dtype=self.dtype, conv=self.conv, init_scheme=self.init_scheme)
    self.reconstructive = ReconstructiveSubNetwork(base_width=self.recon_width, out_channels=3, **kw)
    self.discriminative = DiscriminativeSubNetwork(base_width=self.disc_width, out_channels=2, **kw)

  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    """Reconstructs and segments.

    Args:
      x: (N, H, W, 3) float images (augmented in training, test images at evaluation), H and W divisible
        by 32.
      train: BN mode for both nets (apply with mutable=['batch_stats'] when True).

    Returns:
      (reconstruction (N, H, W, 3) float32, logits (N, H, W, 2) float32).
    """
    _check_input(x, 32, "DRAEM")
    if x.shape[-1] != 3:
      raise ValueError(f"DRAEM: input must have 3 (RGB) channels, got shape {x.shape}; replicate "
                       "grayscale images to 3 channels.")
    x = x.astype(jnp.float32)
    recon = self.reconstructive(x, train)
    pair = [recon, x] if self.disc_input_order == "recon_image" else [x, recon]
    logits = self.discriminative(jnp.concatenate(pair, axis=-1), train)
    return recon, logits


_CONV_INDICES = {"up": (1,), "other": (0, 3)}
_BN_INDICES = {"up": (2,), "other": (1, 4)}


def torch_key_to_flax(key: str) -> tuple[str, tuple[str, ...]] | None:
  """Maps a PyTorch state_dict key of one sub-network to its flax (collection, path).

  Args:
    key: e.g. "encoder.block1.0.weight", "decoder_segment.up_b.2.running_var", "decoder.fin_out.0.bias".

  Returns:
    ("params" | "batch_stats", path tuple), e.g. ("params", ("encoder", "block1", "conv_0", "kernel")), or
    None for "num_batches_tracked" (no flax counterpart). Conv kernels additionally need
    ``transpose(2, 3, 1, 0)`` (OIHW -> HWIO); nothing else changes layout.

  Raises:
    ValueError: for a key that is not part of DRAEM's networks.
  """
  parts = key.split(".")
  if len(parts) != 4 or not parts[2].isdigit():
    raise ValueError(f"torch_key_to_flax: unexpected DRAEM state_dict key {key!r} (expected "
                     "'<encoder|decoder|encoder_segment|decoder_segment>.<block>.<index>.<tensor>').")
  parent, block, index, leaf = parts[0], parts[1], int(parts[2]), parts[3]
  kind = "up" if block.startswith("up") else "other"
  if index in _CONV_INDICES[kind] and leaf in ("weight", "bias"):
    return "params", (parent, block, f"conv_{index}", "kernel" if leaf == "weight" else leaf)
  if index in _BN_INDICES[kind]:
    if leaf == "num_batches_tracked":
      return None
    names = {"weight": ("params", "scale"), "bias": ("params", "bias"),
             "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}
    if leaf in names:
      collection, name = names[leaf]
      return collection, (parent, block, f"bn_{index}", name)
  raise ValueError(f"torch_key_to_flax: {key!r} names no conv or BatchNorm tensor of DRAEM.")
