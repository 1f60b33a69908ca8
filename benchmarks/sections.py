"""Section name -> module, imported on first use (after ``harness.configure_process`` has run)."""

import importlib

from benchmarks import config as config_lib


def module(name: str):
  """The module ``benchmarks.<name>`` of a section in ``config.SECTIONS``."""
  if name not in config_lib.SECTIONS:
    raise ValueError(f"unknown benchmark section {name!r}; choose from {', '.join(config_lib.SECTIONS)}")
  return importlib.import_module(f"benchmarks.{name}")
