"""The train state, optimizer and the two jitted computations of DRAEM: train step and inference.

``train_step`` is one pure function: anomaly synthesis on device, both networks, the three losses,
gradients and the Adam update. It is jitted once with the batch sharded over the ``data`` mesh axis and the
state replicated; BatchNorm statistics are then global over the batch whatever the device count.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from draem_jax import losses
from draem_jax import models
from draem_jax import scoring
from draem_jax import synthesis
from draem_jax.data import pipeline


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs besides the config (the data position is a function of ``step``).

  Attributes:
    step: int32 scalar, number of updates done.
    params: model parameters ``{"reconstructive": ..., "discriminative": ...}``.
    batch_stats: BatchNorm running statistics, same structure.
    opt_state: optax state.
    key: typed PRNG key; the key of step s is ``fold_in(key, s)``.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  key: jax.Array

  def model_variables(self) -> dict[str, Any]:
    return {"params": self.params, "batch_stats": self.batch_stats}

  def train_item(self) -> dict[str, Any]:
    return {"step": self.step, "opt_state": self.opt_state, "key": self.key}


def build_model(config) -> models.DRAEM:
  """The DRAEM module described by ``config.model``."""
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(config.model.dtype)
  if dtype is None:
    raise ValueError(f"config.model.dtype={config.model.dtype!r}: use 'float32' or 'bfloat16'")
  return models.DRAEM(recon_width=config.model.recon_width, disc_width=config.model.disc_width,
                      dtype=dtype, fast_cpu_conv=bool(config.model.get("fast_cpu_conv", False)))


# ceil(N / B): the original's DataLoader length with drop_last=False; the data stream defines it.
steps_per_epoch = pipeline.steps_per_epoch


def learning_rate_schedule(config, num_train_images: int) -> optax.Schedule:
  """Piecewise-constant learning rate over steps.

  original: x0.2 after 80% and 90% of ``num_epochs`` (MultiStepLR in the original code, stepped per
  epoch). The original passes fractional milestones, which never fire unless 0.8*E and 0.9*E are whole
  numbers; here they are rounded up to a whole epoch so the decay always happens (identical for E = 700
  and 800). paper: x0.1 at epochs 400 and 600.
  """
  spe = steps_per_epoch(num_train_images, config.batch_size)
  if config.lr_schedule == "original":
    epochs = [math.ceil(0.8 * config.num_epochs), math.ceil(0.9 * config.num_epochs)]
    factor = 0.2
  elif config.lr_schedule == "paper":
    epochs, factor = [400, 600], 0.1
  elif config.lr_schedule == "constant":
    epochs, factor = [], 1.0
  else:
    raise ValueError(f"config.lr_schedule={config.lr_schedule!r}: use 'original', 'paper' or 'constant'")
  boundaries = {}
  for e in epochs:
    boundaries[e * spe] = boundaries.get(e * spe, 1.0) * factor
  return optax.piecewise_constant_schedule(config.learning_rate, boundaries)


def make_optimizer(schedule: optax.Schedule) -> optax.GradientTransformation:
  """Adam (PyTorch defaults: b1 0.9, b2 0.999, eps 1e-8, no weight decay) on both networks."""
  return optax.adam(schedule, b1=0.9, b2=0.999, eps=1e-8)


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, key: jax.Array,
                       image_shape: tuple[int, int]) -> TrainState:
  """Initialises parameters (with the original's init), optimizer state and the run's key.

  Args:
    model: the DRAEM module.
    tx: optimizer.
    key: typed PRNG key; split into an init key and the run key.
    image_shape: (H, W) of training images.
  """
  init_key, run_key = jax.random.split(key)
  dummy = jnp.zeros((1, *image_shape, 3), jnp.float32)
  variables = model.init(init_key, dummy, train=False)
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables["batch_stats"], opt_state=tx.init(params), key=run_key)


def to_float_images(images: jax.Array) -> jax.Array:
  """uint8 [0, 255] or float [0, 1] (N, H, W, 3) -> float32 [0, 1]; shipping uint8 saves bandwidth.

  The same exact conversion as the input pipeline's (``pipeline.to_unit_float_device``).
  """
  return pipeline.to_unit_float_device(images)


def make_loss_grad_fn(model: nn.Module) -> Callable[..., Any]:
  """Returns ``loss_grad_fn(state, syn) -> (grads, new_batch_stats, metrics)`` for a synthesized batch.

  Both networks in train mode on ``syn.augmented``, ``draem_loss`` against ``syn.target`` and
  ``syn.mask``, and gradients with respect to all parameters.
  """

  def loss_grad_fn(state: TrainState, syn: synthesis.Synthesized):

    def loss_fn(params):
      (recon, logits), new_vars = model.apply(
          {"params": params, "batch_stats": state.batch_stats}, syn.augmented, train=True,
          mutable=["batch_stats"])
      total, terms = losses.draem_loss(recon, syn.target, logits, syn.mask)
      return total, (new_vars["batch_stats"], terms)

    (total, (batch_stats, terms)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    metrics = {"loss": total, **terms, "grad_norm": optax.tree.norm(grads)}
    return grads, batch_stats, metrics

  return loss_grad_fn


def make_grad_fn(model: nn.Module,
                 synthesis_config: synthesis.SynthesisConfig) -> Callable[..., Any]:
  """Returns ``grad_fn(state, images, sources) -> (grads, new_batch_stats, metrics)`` (not jitted).

  The forward half of the train step: on-device anomaly synthesis from the step's key, both networks in
  train mode, ``draem_loss`` and its gradients with respect to all parameters (the focal loss reaches
  the reconstructive net through the reconstruction, as in the original).

  Args of the returned function:
    state: TrainState.
    images: (B, H, W, 3) uint8 or float32 in [0, 1], the clean normal images (global batch).
    sources: (S, H, W, 3) uint8 anomaly-source textures, on device.
  """

  loss_grad_fn = make_loss_grad_fn(model)

  def grad_fn(state: TrainState, images: jax.Array, sources: jax.Array):
    key = jax.random.fold_in(state.key, state.step)
    syn = synthesis.synthesize(key, to_float_images(images), sources, config=synthesis_config)
    grads, batch_stats, metrics = loss_grad_fn(state, syn)
    metrics["anomaly_fraction"] = jnp.mean(syn.has_anomaly)
    return grads, batch_stats, metrics

  return grad_fn


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    synthesis_config: synthesis.SynthesisConfig,
                    schedule: optax.Schedule | None = None) -> Callable[..., Any]:
  """Returns ``train_step(state, images, sources) -> (state, metrics)`` (not yet jitted).

  Arguments as for ``make_grad_fn``. Metrics are float32 scalars: loss, l2, ssim, focal, grad_norm,
  anomaly_fraction (share of examples that received a non-empty simulated anomaly) and, with a
  ``schedule``, the learning rate used by this step.
  """
  grad_fn = make_grad_fn(model, synthesis_config)

  def train_step(state: TrainState, images: jax.Array, sources: jax.Array):
    grads, batch_stats, metrics = grad_fn(state, images, sources)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if schedule is not None:
      metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state)
    return new_state, metrics

  return train_step


def make_infer_fn(model: nn.Module, *, filter_size: int = 21, bgr: bool = False) -> Callable[..., Any]:
  """Returns ``infer(variables, images) -> (anomaly_maps (N,H,W), image_scores (N,), recon)``.

  Eval mode: BatchNorm uses running statistics, so padded rows do not affect real ones; the
  reconstruction is fed to the discriminator as in the original test script. ``bgr=True`` reverses the
  channels of RGB input first, for weights trained on OpenCV (BGR) images such as the released ones.
  """

  def infer(variables, images):
    images = to_float_images(images)
    if bgr:
      images = images[..., ::-1]
    recon, logits = model.apply(variables, images, train=False)
    maps = scoring.anomaly_map(logits)
    return maps, scoring.image_score(maps, filter_size=filter_size), recon

  return infer
