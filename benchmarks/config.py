r"""Benchmark settings (ml_collections): ``--config=benchmarks/config.py[:PRESET]``.

Presets: ``default`` (the CPU tables of BENCHMARKS.md, ~15 min on 2 cores), ``quick`` (smoke run, ~2 min),
``accelerator`` (the GPU/TPU section only, <= 5 min on one GPU), ``tiny`` (the test suite's in-process
run). Any field can be overridden: ``--config.threads=1 --config.train.rows='((64,16,16,8),)'``.
"""

import ml_collections

SECTIONS = ("synthesis", "train", "train_cli", "infer", "scaling", "quality", "accelerator")


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
  preset = preset or "default"
  if preset not in ("default", "quick", "accelerator", "tiny"):
    raise ValueError(f"benchmarks/config.py:{preset}: unknown preset; use default, quick, accelerator or "
                     "tiny")
  c = ml_collections.ConfigDict()
  c.preset = preset
  c.sections = ("synthesis", "train", "train_cli", "infer", "scaling", "quality")
  c.repeats = 7                 # timed calls per side; medians reported, sides interleaved
  c.warmup = 2                  # untimed calls per side after compiling
  c.threads = 0                 # cores for both sides (0 = all this process may use)
  # draem_jax's CPU layout: host devices over which a train/infer batch is split, each running its share
  # single-threaded (0 = one per thread; 1 = one device using every thread, as draem_jax.train runs).
  # Accelerators ignore it.
  c.cpu_devices = 1
  c.anomalib = True             # compare with anomalib where importable
  c.texture_dir = ""            # DTD-layout folder; "" = ../shared/data/dtd_subset/images beside the repo
  c.max_textures = 64
  c.data_dir = ""               # MVTec-layout root for quality; "" = ../shared/data/piped_mvtec
  c.compilation_cache_dir = ""  # JAX persistent cache ("" = off)
  c.output = "benchmark.json"   # JSON report ("" = none); a one-line summary is printed too
  c.markdown_output = ""        # Markdown tables
  c.benchmarks_md = ""          # BENCHMARKS.md to regenerate in place (its "Exported models" section kept)

  c.synthesis = ml_collections.ConfigDict()
  c.synthesis.image_size = 256
  c.synthesis.batch_sizes = (8, 64)
  c.synthesis.per_augmenter = True  # time each augmenter, the Perlin mask and the rotation alone

  c.train = ml_collections.ConfigDict()
  # (image size, recon width, disc width, batch): the targets.
  c.train.rows = ((64, 16, 16, 8), (128, 16, 16, 8), (64, 32, 16, 8), (128, 32, 16, 8), (64, 128, 64, 8))
  c.train.full_width_repeats = 3  # rows with recon width >= 128 take seconds per step

  c.train_cli = ml_collections.ConfigDict()
  c.train_cli.steps = 60        # demo recipe steps through train.train_and_evaluate (rates after step 20)

  c.infer = ml_collections.ConfigDict()
  c.infer.rows = ((64, 32, 16, 8), (128, 16, 16, 8))

  c.scaling = ml_collections.ConfigDict()
  c.scaling.devices = (1, 2)
  c.scaling.per_device_batch = 4
  c.scaling.row = (64, 16, 16)

  c.quality = ml_collections.ConfigDict()
  c.quality.category = "piped_pa_bdp01_tl"
  c.quality.steps = 100
  c.quality.image_size = 64
  c.quality.widths = (32, 16)
  c.quality.batch_size = 8

  c.accelerator = ml_collections.ConfigDict()
  c.accelerator.image_size = 256
  c.accelerator.widths = (128, 64)
  c.accelerator.dtypes = ("float32", "bfloat16")
  c.accelerator.batch_sizes = (8,)
  c.accelerator.max_batch = True     # also the largest batch that fits (doubling from 16, then bisection)
  c.accelerator.max_batch_limit = 256
  c.accelerator.infer_batch = 32
  c.accelerator.peak_tflops = 0.0    # per-device dense bf16 peak; 0 = from the device kind
  c.accelerator.repeats = 10
  c.accelerator.time_budget_s = 270  # no new measurement starts after this much time
  c.accelerator.scaling_devices = 0  # the scaling row's "all local devices" (0 = every local device)

  if preset == "quick":
    c.sections = ("synthesis", "train", "infer")
    c.repeats, c.warmup = 3, 1
    c.max_textures = 16
    c.synthesis.batch_sizes = (8,)
    c.synthesis.per_augmenter = False
    c.train.rows = ((64, 16, 16, 8),)
    c.infer.rows = ((64, 16, 16, 8),)
  elif preset == "accelerator":
    c.sections = ("accelerator",)
    c.anomalib = False
  elif preset == "tiny":
    c.sections = ("synthesis", "train", "infer", "accelerator")
    c.repeats, c.warmup = 1, 0
    c.anomalib = False
    c.max_textures = 4
    c.output = ""
    c.synthesis.image_size = 32
    c.synthesis.batch_sizes = (2,)
    c.train.rows = ((32, 4, 4, 2),)
    c.train_cli.steps = 4
    c.infer.rows = ((32, 4, 4, 2),)
    c.scaling.devices = (1, 2)
    c.scaling.per_device_batch = 2
    c.scaling.row = (32, 4, 4)
    c.accelerator.image_size = 32
    c.accelerator.widths = (4, 4)
    c.accelerator.dtypes = ("bfloat16",)
    c.accelerator.scaling_devices = 2
    c.accelerator.batch_sizes = (2,)
    c.accelerator.max_batch_limit = 2  # the "largest" row reuses batch 2's programs: ~25 s less compiling
    c.accelerator.infer_batch = 2
    c.accelerator.repeats = 1
  return c
