"""One DRAEM training step, the state it updates, and inference.

A batch's path: ``train_step`` picks the step's images from the training set already on the devices
(``pipeline.batch_indices``), converts them uint8 -> float32 once, synthesizes anomalies on the device
(``synthesis.synthesize``), runs both networks in train mode, computes ``draem_loss`` and its gradients
(``loss_and_grads``) and applies Adam. ``jit_train_step`` binds the static parts with
``functools.partial`` and jits it with the batch sharded over the ``data`` mesh axis and everything else
replicated, so BatchNorm statistics are global over the batch whatever the device count. Train, the
benchmarks, the multi-process worker and the tests all use that one helper.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from draem_jax import losses
from draem_jax import models
from draem_jax import parallel
from draem_jax import scoring
from draem_jax import synthesis
from draem_jax import tiling
from draem_jax.data import pipeline


_CROP_SALT = 0x7FFFFFFF


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs besides the config (the data position is a function of ``step``).

  Attributes:
    step: int32 scalar, number of updates done.
    params: model parameters ``{"reconstructive": ..., "discriminative": ...}``.
    batch_stats: BatchNorm running statistics, same structure.
    opt_state: optax state.
    key: typed PRNG key; the key of step s is ``fold_in(key, s)``.
    ema_params: exponential moving average of ``params`` (``config.ema_decay`` > 0), else None: a
      None leaves the state's arrays and its checkpoint items exactly as without EMA.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  key: jax.Array
  ema_params: Any = None

  def model_variables(self) -> dict[str, Any]:
    return {"params": self.params, "batch_stats": self.batch_stats}

  def ema_variables(self) -> dict[str, Any] | None:
    """The EMA weights with the running BN statistics (those of the raw weights), or None."""
    if self.ema_params is None:
      return None
    return {"params": self.ema_params, "batch_stats": self.batch_stats}

  def train_item(self) -> dict[str, Any]:
    return {"step": self.step, "opt_state": self.opt_state, "key": self.key}


def build_model(config) -> models.DRAEM:
  """The DRAEM module described by ``config.model``."""
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(config.model.dtype)
  if dtype is None:
    raise ValueError(f"config.model.dtype={config.model.dtype!r}: use 'float32' or 'bfloat16'")
  return models.DRAEM(recon_width=config.model.recon_width, disc_width=config.model.disc_width,
                      dtype=dtype, init_scheme=config.model.init)


steps_per_epoch = pipeline.steps_per_epoch


def learning_rate_schedule(config, num_train_images: int) -> optax.Schedule:
  """Piecewise-constant learning rate over steps: x ``lr_decay_factor`` at each ``lr_decay_fractions``.

  A fraction f of ``num_epochs`` becomes the boundary epoch ceil(f * E) (MultiStepLR in the original
  code, stepped per epoch; the original passes fractional milestones, which never fire unless 0.8 E and
  0.9 E are whole numbers; rounding up makes the decay always happen, identical for E = 700 and 800).
  The paper's epochs 400 and 600 of 700 are the fractions 4/7 and 6/7.
  """
  spe = steps_per_epoch(num_train_images, config.batch_size)
  boundaries: dict[int, float] = {}
  for fraction in config.lr_decay_fractions:
    # The tolerance keeps e.g. 4/7 * 700 = 400.00000000000006 at epoch 400.
    epoch = math.ceil(fraction * config.num_epochs - 1e-9)
    boundaries[epoch * spe] = boundaries.get(epoch * spe, 1.0) * config.lr_decay_factor
  return optax.piecewise_constant_schedule(config.learning_rate, boundaries)


def make_optimizer(schedule: optax.Schedule) -> optax.GradientTransformation:
  """Adam (PyTorch defaults: b1 0.9, b2 0.999, eps 1e-8, no weight decay) on both networks."""
  return optax.adam(schedule, b1=0.9, b2=0.999, eps=1e-8)


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, key: jax.Array,
                       image_shape: tuple[int, int], ema: bool = False) -> TrainState:
  """Initialises parameters (with the model's init), optimizer state and the run's key.

  Args:
    model: the DRAEM module.
    tx: optimizer.
    key: typed PRNG key; split into an init key and the run key.
    image_shape: (H, W) of training images.
    ema: also carry an EMA of the parameters, starting at the initial parameters.
  """
  init_key, run_key = jax.random.split(key)
  dummy = jnp.zeros((1, *image_shape, 3), jnp.float32)
  variables = model.init(init_key, dummy, train=False)
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables["batch_stats"], opt_state=tx.init(params), key=run_key,
                    ema_params=jax.tree.map(jnp.copy, params) if ema else None)


def ema_update(ema_params: Any, params: Any, decay: float) -> Any:
  """``decay * ema + (1 - decay) * params``, leaf by leaf (float32)."""
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)


def loss_and_grads(model: nn.Module, params: Any, batch_stats: Any, syn: synthesis.Synthesized,
                   loss_config: losses.LossConfig = losses.ORIGINAL_LOSS):
  """Both networks in train mode on ``syn.augmented``, ``draem_loss`` (weighted by ``loss_config``)
  and its gradients.

  The focal loss reaches the reconstructive net through the reconstruction, as in the original.

  Returns:
    ``(grads, new_batch_stats, metrics)``; metrics: float32 scalars loss, l2, ssim, focal, grad_norm.
  """

  def loss_fn(params):
    (recon, logits), new_vars = model.apply({"params": params, "batch_stats": batch_stats},
                                            syn.augmented, train=True, mutable=["batch_stats"])
    total, terms = losses.draem_loss(recon, syn.target, logits, syn.mask, weights=loss_config.weights,
                                     focal_normal_weight=loss_config.focal_normal_weight)
    return total, (new_vars["batch_stats"], terms)

  (total, (new_stats, terms)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return grads, new_stats, {"loss": total, **terms, "grad_norm": optax.tree.norm(grads)}


def train_step(state: TrainState, train_images: jax.Array, sources: jax.Array, *, model: nn.Module,
               tx: optax.GradientTransformation, synthesis_config: synthesis.SynthesisConfig,
               schedule: optax.Schedule, batch_size: int, data_seed: int, crop_size: int | None = None,
               batch_sharding: jax.sharding.Sharding | None = None,
               ema_decay: float = 0.0,
               loss_config: losses.LossConfig = losses.ORIGINAL_LOSS) -> tuple[TrainState, dict[str, Any]]:
  """One update: this step's images, anomaly synthesis, both networks, the losses and Adam.

  Args:
    state: the TrainState (replicated).
    train_images: uint8 (N, H, W, 3), the whole training set, on every device (with ``crop_size``:
      loaded larger, (N, L, L, 3) with L >= crop_size).
    sources: uint8 (S, H, W, 3) anomaly-source textures, on every device.
    model, tx, synthesis_config, schedule: the recipe (static).
    batch_size: static global batch size B.
    data_seed: static seed of the image order.
    crop_size: static; if set, each example is a random ``crop_size`` crop of its (larger) image
      (``config.train_crop``), drawn from a key of its own.
    batch_sharding: where the step's batch lives (split over the ``data`` axis); None leaves it to XLA.
    ema_decay: static; > 0 also updates ``state.ema_params`` (which must exist) with this decay.
    loss_config: static; the objective's weights (default the original's).

  Returns:
    ``(new_state, metrics)``; metrics are float32 scalars: loss, l2, ssim, focal, grad_norm,
    anomaly_fraction (share of examples with a non-empty simulated anomaly), learning_rate.
  """
  # 1. The step's images, picked on the device from the step number (no host pipeline).
  step_key = jax.random.fold_in(state.key, state.step)
  index = pipeline.batch_indices(state.step, train_images.shape[0], batch_size, data_seed)
  rows = train_images[index]
  if crop_size is not None:
    # A salt that is never an example index: synthesis gives example i the key fold_in(step_key, i).
    rows = tiling.random_crops(jax.random.fold_in(step_key, _CROP_SALT), rows, crop_size)
  images = pipeline.to_unit_float_device(rows)
  if batch_sharding is not None:
    images = jax.lax.with_sharding_constraint(images, batch_sharding)
  # 2. Anomaly synthesis on the device, one key per example.
  syn = synthesis.synthesize(step_key, images, sources, config=synthesis_config)
  # 3. Losses and gradients of both networks.
  grads, batch_stats, metrics = loss_and_grads(model, state.params, state.batch_stats, syn, loss_config)
  # 4. Adam.
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  # 5. The EMA of the weights, for evaluation only (config.ema_decay).
  ema_params = state.ema_params
  if ema_decay:
    if ema_params is None:
      raise ValueError("train_step: ema_decay > 0 needs a state made with create_train_state(ema=True)")
    ema_params = ema_update(ema_params, params, ema_decay)
  metrics["anomaly_fraction"] = jnp.mean(syn.has_anomaly)
  metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state, ema_params=ema_params)
  return new_state, metrics


def jit_train_step(mesh: jax.sharding.Mesh, *, model: nn.Module, tx: optax.GradientTransformation,
                   synthesis_config: synthesis.SynthesisConfig, schedule: optax.Schedule,
                   batch_size: int, data_seed: int, crop_size: int | None = None,
                   ema_decay: float = 0.0, loss_config: losses.LossConfig = losses.ORIGINAL_LOSS):
  """``train_step`` with the recipe bound, jitted over ``mesh``; the state is donated.

  Returns:
    ``step_fn(state, train_images, sources) -> (state, metrics)``; every argument replicated.
  """
  repl = parallel.replicated(mesh)
  parallel.check_batch_size(batch_size, mesh.size, jax.process_count(), name="config.batch_size")
  fn = functools.partial(train_step, model=model, tx=tx, synthesis_config=synthesis_config,
                         schedule=schedule, batch_size=batch_size, data_seed=data_seed,
                         crop_size=crop_size, batch_sharding=parallel.data_sharding(mesh),
                         ema_decay=ema_decay, loss_config=loss_config)
  return jax.jit(fn, in_shardings=(repl, repl, repl), out_shardings=(repl, repl), donate_argnums=0)


def make_infer_fn(model: nn.Module, *, filter_size: int = 21, bgr: bool = False):
  """Returns ``infer(variables, images) -> (anomaly_maps (N,H,W), image_scores (N,), recon)``.

  Eval mode: BatchNorm uses running statistics, so padded rows do not affect real ones; the
  reconstruction is fed to the discriminator as in the original test script. ``bgr=True`` reverses the
  channels of RGB input first, for weights trained on OpenCV (BGR) images such as the released ones.
  Images: (N, H, W, 3) uint8, or float32 in [0, 1].
  """

  def infer(variables, images):
    images = pipeline.to_unit_float_device(images)
    if bgr:
      images = images[..., ::-1]
    recon, logits = model.apply(variables, images, train=False)
    maps = scoring.anomaly_map(logits)
    return maps, scoring.image_score(maps, filter_size=filter_size), recon

  return infer
