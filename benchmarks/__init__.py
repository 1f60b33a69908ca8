"""Benchmarks of draem_jax against anomalib's DRAEM (the ``bench`` extra), on the same machine.

One entry point: ``python -m benchmarks.run`` (see ``benchmarks/run.py`` and BENCHMARKS.md). One file per
section (synthesis, train, train_cli, infer, scaling, quality, accelerator), the shared timing and
machine helpers in ``harness.py``, anomalib's side in ``anomalib_side.py``, the settings in the
ml_collections config ``config.py``. Not part of the installed package: run from the repository root.
"""
