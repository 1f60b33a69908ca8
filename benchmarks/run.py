r"""The benchmark's one entry point (run from the repository root).

  python -m benchmarks.run --quick                                  # smoke run, ~2 min on 2 cores
  python -m benchmarks.run                                          # the CPU tables of BENCHMARKS.md
  python -m benchmarks.run --config=benchmarks/config.py:accelerator  # GPU/TPU section, <= 5 min
  python -m benchmarks.run --config.sections=train --config.threads=2 --config.cpu_devices=1

anomalib is compared where importable (the ``bench`` extra, in its own virtualenv: BENCHMARKS.md).
``--quick`` is short for ``--config=benchmarks/config.py:quick``; ``--config.FIELD=VALUE`` overrides
any field of ``benchmarks/config.py``. Writes ``config.output`` (JSON; refuses to overwrite an existing
file unless ``--overwrite``), prints one JSON summary line and the Markdown tables, and with
``--config.benchmarks_md=BENCHMARKS.md`` regenerates that file's generated block in place.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from benchmarks import config as config_lib
from benchmarks import sections

_CONFIG_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config.py")
if __name__ == "__main__":
  # --quick means --config=benchmarks/config.py:quick, and no --config means benchmarks/config.py: the
  # file is named on the command line rather than as the flag's default, because config_flags loads a
  # default (and applies the --config.FIELD overrides to it) when the flag is defined, where a misspelt
  # field would be a traceback instead of parse_flags' one line.
  sys.argv = [f"--config={_CONFIG_FILE}:quick" if a == "--quick" else a for a in sys.argv]
  if not any(a == "--config" or a.startswith("--config=") for a in sys.argv[1:]):
    sys.argv.insert(1, f"--config={_CONFIG_FILE}")
_CONFIG = config_flags.DEFINE_config_file("config", None,
                                          "Benchmark settings (benchmarks/config.py[:preset]).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing config.output file.")


@dataclasses.dataclass
class Context:
  setup: Any
  anomalib: Any
  backend: str


def validate(config) -> None:
  unknown = [s for s in config.sections if s not in config_lib.SECTIONS]
  if unknown:
    raise ValueError(f"config.sections: unknown {unknown}; choose from {', '.join(config_lib.SECTIONS)}")
  if config.repeats < 1 or config.warmup < 0:
    raise ValueError(f"config.repeats={config.repeats} must be >= 1 and config.warmup={config.warmup} >= 0")
  for name, rows in (("train.rows", config.train.rows), ("infer.rows", config.infer.rows)):
    for row in rows:
      if len(row) != 4 or row[0] % 32 or min(row) < 1:
        raise ValueError(f"config.{name}: {row} must be (image size, recon width, disc width, batch) with "
                         "the image size a multiple of 32 (five poolings in the discriminative net)")


def run(config) -> dict[str, Any]:
  """Configures the process, runs the sections in order, returns the report (JSON-serialisable)."""
  validate(config)
  from benchmarks import harness  # pylint: disable=g-import-not-at-top
  min_devices = max(config.scaling.devices) if "scaling" in config.sections else 1
  setup = harness.configure_process(config.threads, config.cpu_devices, min_devices,
                                    config.compilation_cache_dir)
  import jax  # pylint: disable=g-import-not-at-top
  from benchmarks import anomalib_side  # pylint: disable=g-import-not-at-top
  a = anomalib_side.load(config.anomalib, setup.threads)
  ctx = Context(setup=setup, anomalib=a, backend=jax.default_backend())
  report = {"machine": harness.machine_info(setup), "config": config.to_dict(),
            "anomalib": {"available": a.available, "version": a.version, "reason": a.reason}, "sections": {}}
  for name in config_lib.SECTIONS:
    if name in config.sections:
      logging.info("benchmark section %s", name)
      t0 = time.perf_counter()
      result = sections.module(name).run(config, ctx)
      result["load_average_after"] = harness.load_average()
      result["section_wall_s"] = time.perf_counter() - t0
      report["sections"][name] = result
      logging.info("section %s took %.1f s", name, time.perf_counter() - t0)
  report["machine"]["load_average_after"] = harness.load_average()
  report["machine"]["process_peak_rss_mb"] = harness.process_peak_rss_mb()
  return report


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from benchmarks import report as report_lib  # pylint: disable=g-import-not-at-top
  from draem_jax import writers  # pylint: disable=g-import-not-at-top
  writers.quiet_library_logs()
  config = _CONFIG.value
  try:
    if config.output and os.path.exists(config.output) and not _OVERWRITE.value:
      raise ValueError(f"{config.output} exists; pass --overwrite to replace it or set --config.output")
    report = run(config)
    text = report_lib.markdown(report)
    print(report_lib.summary_line(report))
    if "accelerator" in report["sections"]:
      print(sections.module("accelerator").json_line(report["sections"]["accelerator"]))
    print(text)
    if config.output:
      with open(config.output, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, default=float)
    if config.markdown_output:
      with open(config.markdown_output, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    if config.benchmarks_md:
      report_lib.update_benchmarks_md(config.benchmarks_md, text)
  except (ValueError, FileNotFoundError) as e:
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  from draem_jax import writers  # pylint: disable=g-import-not-at-top
  app.run(main, flags_parser=functools.partial(writers.parse_flags, known_config=config_lib.get_config))
