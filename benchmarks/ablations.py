r"""The recipe switches (docs/recipe.md) measured: each ablation trained for a fixed step budget.

  python -m benchmarks.ablations --data_dir=PIPED_MVTEC --textures=DTD_IMAGES --out=ablations \
      [--categories=a,b,...] [--ablations=original,fast,...] [--seeds=0,1] [--steps=100]

Each (ablation, category, seed) is one ``train.train_and_evaluate`` of ``recipes.mvtec(category)`` at
``--size`` px, widths ``--widths``, batch ``--batch``, constant learning rate 1e-4, ``--steps`` steps
(rounded up to whole epochs), no held-out images (everything trains, as anomalib's side), then the test
split's image AUROC, pixel AP and AUPRO. ``--ema_decay`` adds the EMA weights' metrics to every run (the
EMA does not change the raw training, so the raw metrics stay the ablation's own). ``anomalib`` as an
ablation trains anomalib's DRAEM on the same images, steps, widths and learning rate and scores it with
the same metric code (run it with the ``bench`` extra's environment). The ``CROSSES`` train one half of
each side with the other's: anomalib's networks, loss and Adam on our synthesis (also with the original's
init or focal term), ours on anomalib's generator or from its initial weights, through one loop with the
same image batches (bench environment). One run at a time.
Rows are appended to ``OUT/runs.jsonl`` as they finish (an interrupted sweep continues where it
stopped) and ``OUT/table.md`` is rewritten after each: per ablation the mean over categories of each
seed, then mean and spread (sample std) over seeds, and the mean wall time per run with the 1-minute
load average around it. Quality does not depend on machine load; wall times do.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import tempfile
import time
from typing import Callable

import numpy as np

from draem_jax import recipes

KEYS = ("image_auroc", "pixel_ap", "aupro")


def _set(**fields) -> Callable:
  def apply(c):
    for name, value in fields.items():
      head, _, last = name.replace("__", ".").rpartition(".")
      (c[head] if head else c)[last] = value
  return apply


_FAST_V1_FIELDS = dict(source_resize="antialias", synthesis__empty_mask="retry",
                       synthesis__rotate_fill="edge", model__init="pytorch_default")
_FAST_V1 = _set(**_FAST_V1_FIELDS)
# Rotation off + retry (fast before the focal weight): the base of the focal-weight ablations.
_ROTATE_OFF_RETRY = dict(synthesis__rotate_prob=0.0, synthesis__empty_mask="retry")


# name -> what it changes relative to the original recipe (docs/recipe.md).
ABLATIONS: dict[str, Callable] = {
    "original": _set(),
    "antialias": _set(source_resize="antialias"),
    "retry": _set(synthesis__empty_mask="retry"),
    "rotate_edge": _set(synthesis__rotate_fill="edge"),
    "rotate_off": _set(synthesis__rotate_prob=0.0),
    "rotate_45": _set(synthesis__rotate_degrees=45.0),
    "init_pytorch": _set(model__init="pytorch_default"),
    "init_width": _set(model__init="width_scaled"),
    "ema_0.9": _set(ema_decay=0.9),
    "texture_paper": _set(synthesis__texture_weight_range=(0.1, 1.0)),
    "lr_3e-4": _set(learning_rate=3e-4),
    "fast": lambda c: recipes._fast(c),  # pylint: disable=protected-access  (the variant's own switches)
    # The first definition of fast (antialias, retry, edge fill, PyTorch init), and it without rotation.
    "fast_v1": _FAST_V1,
    "fast_v1_rotate_off": _set(**_FAST_V1_FIELDS, synthesis__rotate_prob=0.0),
    # Each of fast's other switches on top of rotation off: which of them helps or hurts without it.
    "rotate_off_antialias": _set(synthesis__rotate_prob=0.0, source_resize="antialias"),
    "rotate_off_retry": _set(**_ROTATE_OFF_RETRY),
    "rotate_off_init_pytorch": _set(synthesis__rotate_prob=0.0, model__init="pytorch_default"),
    # The focal loss's weight on normal pixels, on top of rotate_off_retry (fast before this switch): 0
    # with half the focal weight is what anomalib's DRAEM trains with under kornia >= 0.9
    # (FocalLoss(alpha=1) weights class 0 by 1 - alpha). fast was the 0.1 one, then 0.05 with the EMA.
    "fast_focal_anomalous_only": _set(**_ROTATE_OFF_RETRY, loss__focal_normal_weight=0.0,
                                      loss__weights=(1.0, 1.0, 0.5)),
    "fast_focal_normal_0.1": _set(**_ROTATE_OFF_RETRY, loss__focal_normal_weight=0.1),
    "fast_focal_normal_0.3": _set(**_ROTATE_OFF_RETRY, loss__focal_normal_weight=0.3),
    # The focal weight either side of 0.1: did the seed-0 collapse of its pixel AP come from the weight?
    # (0.05 with the EMA as the model is fast now.)
    "fast_focal_normal_0.05": _set(**_ROTATE_OFF_RETRY, loss__focal_normal_weight=0.05),
    "fast_focal_normal_0.2": _set(**_ROTATE_OFF_RETRY, loss__focal_normal_weight=0.2),
}


def make_config(ablation: str, category: str, seed: int, args) -> tuple:
  c = recipes.mvtec(category)
  c.seed = seed
  c.dataset = "folder"
  c.data_dir = args.data_dir
  c.anomaly_source_path = args.textures
  c.image_size = args.size
  c.model.recon_width, c.model.disc_width = args.widths
  c.batch_size = args.batch
  c.lr_decay_fractions = ()  # constant learning rate over the short budget
  c.validation.fraction = 0.0
  c.checkpoint_every_steps = 10**9  # the final step is saved anyway
  c.log_every_steps = 25
  c.eval.num_visualizations = 0
  c.eval.batch_size = args.batch
  ABLATIONS[ablation](c)
  if args.ema_decay and not c.ema_decay:
    c.ema_decay = args.ema_decay  # evaluated beside the raw weights; the raw training is unchanged
  num_train = len([f for f in os.listdir(os.path.join(args.data_dir, category, "train", "good"))
                   if not f.startswith(".")])
  spe = math.ceil(num_train / c.batch_size)
  c.num_epochs = max(1, math.ceil(args.steps / spe))
  return c, c.num_epochs * spe


def _load1() -> float:
  return os.getloadavg()[0]


def _test_metrics(c, predict) -> dict:
  """The test split's metrics for ``predict(uint8 NHWC batch) -> (maps (N, H, W), scores (N,))``."""
  from draem_jax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  from draem_jax.data import datasets  # pylint: disable=g-import-not-at-top
  test = datasets.load_test_split(c, "")
  maps, scores = zip(*(predict(test.images[s:s + c.batch_size])
                       for s in range(0, len(test.images), c.batch_size)))
  return metrics_lib.compute_all(image_labels=test.labels, image_scores=np.concatenate(scores),
                                 masks=test.masks, anomaly_maps=np.concatenate(maps),
                                 fpr_limit=c.eval.aupro_fpr_limit)


def _batches(c, total: int, seed: int):
  """``total`` uint8 NHWC training batches, replacement-free picks from a seeded generator."""
  from draem_jax.data import datasets  # pylint: disable=g-import-not-at-top
  images = datasets.load_split(c, "", "train").images
  rng = np.random.default_rng(seed)
  for _ in range(total):
    yield images[rng.choice(len(images), c.batch_size, replace=len(images) < c.batch_size)]


def _anomalib(seed: int):
  from benchmarks import anomalib_side  # pylint: disable=g-import-not-at-top
  a = anomalib_side.load(True, threads=os.cpu_count() or 1)
  if not a.available:
    raise SystemExit(f"error: {a.reason}")
  a.torch.manual_seed(seed)
  return a


def _our_synthesis(c, seed: int):
  """``(i, float NHWC batch) -> Synthesized`` by ``draem_jax.synthesis`` with ``c``'s synthesis fields, step
  ``i`` keyed ``fold_in(key(seed), i)`` (one key per example inside it, as in the train step)."""
  import jax  # pylint: disable=g-import-not-at-top
  from draem_jax import synthesis  # pylint: disable=g-import-not-at-top
  from draem_jax.data import datasets  # pylint: disable=g-import-not-at-top
  cfg = recipes.synthesis_config(c)
  sources = jax.device_put(datasets.load_anomaly_sources(c))
  fn = jax.jit(lambda key, x, src: synthesis.synthesize(key, x, src, config=cfg))
  key = jax.random.key(seed)
  return lambda i, x: fn(jax.random.fold_in(key, i), x, sources)


def _our_generator(a, c, seed: int):
  """``x -> (augmented, mask)`` on torch NCHW batches from ``_our_synthesis``, one step per call."""
  if c.synthesis.rotate_prob:
    raise SystemExit("the anomalib-side loss takes the unrotated image as its target: use rotate_prob=0")
  synthesize, count = _our_synthesis(c, seed), [0]

  def generate(x):
    syn = synthesize(count[0], x.permute(0, 2, 3, 1).numpy())
    count[0] += 1
    return tuple(a.torch.from_numpy(np.asarray(v).transpose(0, 3, 1, 2).copy())
                 for v in (syn.augmented, syn.mask))
  return generate


def _original_weights_init(a, model) -> None:
  """The original code's weights_init on a torch model: conv kernels N(0, 0.02), BN N(1, 0.02) and 0."""
  nn = a.torch.nn
  for m in model.modules():
    if isinstance(m, nn.Conv2d):
      nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
      nn.init.normal_(m.weight, 1.0, 0.02)
      nn.init.zeros_(m.bias)


def _original_focal(a):
  """The original code's focal term on anomalib's side: kornia's ``focal_loss`` with every class weighted
  1 (``alpha=None``), times 2 because its mean runs over both classes' slices."""
  from kornia import losses as kornia_losses  # pylint: disable=g-import-not-at-top
  return lambda prediction, target: 2.0 * kornia_losses.focal_loss(prediction, target, alpha=None,
                                                                     reduction="mean")


def run_anomalib(c, total: int, seed: int, our_synthesis: bool = False, original_init: bool = False,
                 original_focal: bool = False) -> dict:
  """anomalib's side on the same data, steps, widths and metric code (the ``bench`` extra's environment):
  its generator (or, with ``our_synthesis``, ours with ``c``'s synthesis fields), DraemModel (with
  ``original_init``: re-initialised as the original code does), DraemLoss (with ``original_focal``: its
  focal term as the original's) and Adam (``benchmarks.anomalib_side``); image score = max of its anomaly
  map (anomalib's)."""
  a = _anomalib(seed)
  model, step = a.trainer(c.model.recon_width, c.model.disc_width, c.anomaly_source_path, c.learning_rate,
                          generator=_our_generator(a, c, seed) if our_synthesis else None,
                          focal=_original_focal(a) if original_focal else None)
  if original_init:
    _original_weights_init(a, model)  # before any step: Adam's state is still empty
  for batch in _batches(c, total, seed):
    step(a.to_torch(batch))
  model.eval()

  def predict(images):
    with a.torch.inference_mode():
      out = model(a.to_torch(images))
    return out.anomaly_map.reshape(-1, *images.shape[1:3]).numpy(), out.pred_score.reshape(-1).numpy()
  return _test_metrics(c, predict)


def run_ours(c, total: int, seed: int, anomalib_synthesis: bool = False, anomalib_init: bool = False) -> dict:
  """Our networks, ``draem_loss`` and Adam (``steps``) on the same batches as ``run_anomalib``, with our
  synthesis (``c``'s fields) or anomalib's generator, from our initialisation or from the initial weights
  of anomalib's DraemModel (seeded as on its side, converted by ``convert``); our scoring (image score =
  max of the 21x21 mean-filtered map)."""
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from draem_jax import convert, steps, synthesis  # pylint: disable=g-import-not-at-top
  a = _anomalib(seed)
  model = steps.build_model(c)
  tx = steps.make_optimizer(steps.learning_rate_schedule(c, 1))
  state = jax.jit(lambda k: steps.create_train_state(model, tx, k, (c.image_size, c.image_size)))(
      jax.random.key(seed))
  if anomalib_init:
    sd = {k: v.numpy() for k, v in a.model(c.model.recon_width, c.model.disc_width).state_dict().items()}
    variables = convert.anomalib_state_dict_to_variables(sd)
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), variables["params"])
    state = state.replace(params=params, batch_stats=variables["batch_stats"], opt_state=tx.init(params))
  if anomalib_synthesis:
    generate = a.generator(c.anomaly_source_path)
  else:
    synthesize = _our_synthesis(c, seed)

  @jax.jit
  def update(state, syn):
    grads, batch_stats, _ = steps.loss_and_grads(model, state.params, state.batch_stats, syn,
                                                 recipes.loss_config(c))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         batch_stats=batch_stats, opt_state=opt_state)

  def nhwc(t):
    return np.ascontiguousarray(t.numpy().transpose(0, 2, 3, 1))

  for i, batch in enumerate(_batches(c, total, seed)):
    x = a.to_torch(batch)
    if anomalib_synthesis:
      augmented, mask = generate(x)
      mask = nhwc(mask)
      syn = synthesis.Synthesized(target=nhwc(x), augmented=nhwc(augmented), mask=mask,
                                  has_anomaly=mask.max(axis=(1, 2, 3)))
    else:
      syn = synthesize(i, nhwc(x))
    state = update(state, syn)
  infer = jax.jit(steps.make_infer_fn(model))
  variables = {"params": state.params, "batch_stats": state.batch_stats}

  def predict(images):
    maps, scores, _ = infer(variables, images)
    return np.asarray(maps), np.asarray(scores)
  return _test_metrics(c, predict)


# Crosses of the two sides: which half of the gap to anomalib is the synthesis, which the training.
# name -> (our side's base ablation, runner). The crosses were measured with rotate_off_retry as our
# recipe (fast before the focal switch); anomalib's side uses only its synthesis fields.
_BASE = "rotate_off_retry"
CROSSES = {
    # anomalib's networks, loss and Adam on fast's synthesis (one image batch per step, as its side).
    "anomalib_on_fast_synthesis": (_BASE, lambda c, t, s: run_anomalib(c, t, s, our_synthesis=True)),
    # ... and from the original code's initialisation.
    "anomalib_on_fast_synthesis_original_init": (
        _BASE, lambda c, t, s: run_anomalib(c, t, s, our_synthesis=True, original_init=True)),
    # ... and with the original code's focal term (normal pixels weighted as anomalous ones).
    "anomalib_on_fast_synthesis_original_focal": (
        _BASE, lambda c, t, s: run_anomalib(c, t, s, our_synthesis=True, original_focal=True)),
    # Our networks, loss and Adam on anomalib's generator.
    "fast_on_anomalib_synthesis": (_BASE, lambda c, t, s: run_ours(c, t, s, anomalib_synthesis=True)),
    # Ours on fast's synthesis, from anomalib's initial weights; and through this runner's batches alone.
    "fast_from_anomalib_init": (_BASE, lambda c, t, s: run_ours(c, t, s, anomalib_init=True)),
    "fast_same_batches": (_BASE, run_ours),
}
# Every entry that does not go through train.train_and_evaluate: anomalib's side (on the original's
# config fields) and the crosses.
_RUNNERS = {"anomalib": ("original", run_anomalib), **CROSSES}


def run_one(ablation: str, category: str, seed: int, args) -> dict:
  from draem_jax import train  # pylint: disable=g-import-not-at-top  (JAX set up after the flags)
  base, runner = _RUNNERS.get(ablation, (ablation, None))
  c, total = make_config(base, category, seed, args)
  load_before = _load1()
  t0 = time.perf_counter()
  if runner is not None:
    results = runner(c, total, seed)
  else:
    with tempfile.TemporaryDirectory(prefix="draem_ablation_") as workdir:
      results = train.train_and_evaluate(c, workdir)
  row = {"ablation": ablation, "category": category, "seed": seed, "steps": total,
         "wall_s": time.perf_counter() - t0, "load_before": load_before, "load_after": _load1(),
         **{k: results[k] for k in KEYS}}
  for k in KEYS:
    for other in (f"ema_{k}", f"raw_{k}"):  # the EMA's beside raw weights, or the raw beside an EMA model
      if other in results:
        row[other] = results[other]
  return row


def table(rows: list[dict], ablations: list[str]) -> str:
  """Markdown: per ablation, mean over categories per seed, then mean ± std over seeds."""
  keys = list(KEYS) + [f"{p}_{k}" for p in ("ema", "raw") for k in KEYS if any(f"{p}_{k}" in r for r in rows)]
  head = ["ablation", "runs"] + [k.replace("_", " ") for k in keys] + ["wall s / run", "load 1-min"]
  out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name in ablations:
    mine = [r for r in rows if r["ablation"] == name]
    if not mine:
      continue
    cells = [name, str(len(mine))]
    seeds = sorted({r["seed"] for r in mine})
    for k in keys:
      per_seed = [np.mean([r[k] for r in mine if r["seed"] == s and r.get(k) is not None]) for s in seeds]
      per_seed = [v for v in per_seed if np.isfinite(v)]
      if not per_seed:
        cells.append("-")
        continue
      spread = f" ± {100 * np.std(per_seed, ddof=1):.1f}" if len(per_seed) > 1 else ""
      cells.append(f"{100 * np.mean(per_seed):.1f}{spread}")
    cells.append(f"{np.mean([r['wall_s'] for r in mine]):.0f}")
    loads = [r["load_before"] for r in mine] + [r["load_after"] for r in mine]
    cells.append(f"{min(loads):.1f}-{max(loads):.1f}")
    out.append("| " + " | ".join(cells) + " |")
  return "\n".join(out) + "\n"


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--data_dir", required=True, help="MVTec-layout root (e.g. the PIPED categories)")
  p.add_argument("--textures", required=True, help="anomaly-source folder (e.g. DTD images)")
  p.add_argument("--out", required=True, help="folder for runs.jsonl and table.md")
  p.add_argument("--categories", default="", help="comma-separated; default: every category folder")
  p.add_argument("--ablations", default=",".join(ABLATIONS),
                 help=f"comma-separated of {list(ABLATIONS)}, or anomalib (its side), or a cross "
                      f"{list(CROSSES)} (both in the bench extra's environment)")
  p.add_argument("--seeds", default="0,1")
  p.add_argument("--steps", type=int, default=100)
  p.add_argument("--size", type=int, default=64)
  p.add_argument("--widths", default="32,16")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--ema_decay", type=float, default=0.0,
                 help="> 0: every run also keeps an EMA of its weights and reports its metrics (ema_*)")
  p.add_argument("--order", choices=("seed_first", "ablation_first"), default="seed_first",
                 help="seed_first: every ablation on every category for seed 0, then seed 1, ...")
  args = p.parse_args()
  args.widths = tuple(int(w) for w in args.widths.split(","))
  ablations = [a for a in args.ablations.split(",") if a]
  unknown = set(ablations) - set(ABLATIONS) - set(_RUNNERS)
  if unknown:
    raise SystemExit(f"unknown ablation(s) {sorted(unknown)}; known: {list(ABLATIONS)}")
  categories = [c for c in args.categories.split(",") if c] or sorted(
      d for d in os.listdir(args.data_dir) if os.path.isdir(os.path.join(args.data_dir, d)))
  seeds = [int(s) for s in args.seeds.split(",")]
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  log = out / "runs.jsonl"
  rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
  done = {(r["ablation"], r["category"], r["seed"]) for r in rows}
  if args.order == "seed_first":
    plan = [(a, c, s) for s in seeds for c in categories for a in ablations]
  else:
    plan = [(a, c, s) for a in ablations for s in seeds for c in categories]
  for a, c, s in plan:
    if (a, c, s) in done:
      continue
    row = run_one(a, c, s, args)
    rows.append(row)
    with log.open("a") as f:
      f.write(json.dumps(row) + "\n")
    (out / "table.md").write_text(table(rows, ablations))
    print(f"{a} {c} seed {s}: " + ", ".join(f"{k} {row[k]:.3f}" for k in KEYS)
          + f" ({row['wall_s']:.0f} s, load {row['load_before']:.1f}-{row['load_after']:.1f})", flush=True)


if __name__ == "__main__":
  main()
