"""The launchers in launch/: the commands they run, checked with stand-ins for python and gcloud."""

import os
import pathlib
import shlex
import subprocess
import sys

from draem_jax import published

LAUNCH = pathlib.Path(__file__).resolve().parent.parent / "launch"


def _stubs(tmp_path):
  """A bin folder whose python records train/summary calls and runs everything else for real."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  log = tmp_path / "calls.txt"
  (bin_dir / "python").write_text(
      "#!/usr/bin/env bash\n"
      'if [ "$1 $2" = "-m draem_jax.train" ] || [ "$1 $2" = "-m draem_jax.summary" ]; then\n'
      f'  echo "CUDA=${{CUDA_VISIBLE_DEVICES:-all}} $*" >> {shlex.quote(str(log))}; exit 0\n'
      "fi\n"
      f'exec {shlex.quote(sys.executable)} "$@"\n')
  (bin_dir / "gcloud").write_text(
      f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" >> {shlex.quote(str(log))}\n')
  for f in bin_dir.iterdir():
    f.chmod(0o755)
  env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
  return env, log


def test_mvtec_all_runs_every_category_with_the_overrides(tmp_path):
  env, log = _stubs(tmp_path)
  root = tmp_path / "runs"
  out = subprocess.run(["bash", str(LAUNCH / "mvtec_all.sh"), "/d/mvtec", "/d/dtd", str(root),
                        "--config.batch_size=16"], env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  calls = log.read_text().splitlines()
  assert len(calls) == 16
  for cat, call in zip(published.CATEGORIES, calls):
    assert call == (f"CUDA=all -m draem_jax.train --config=configs/mvtec.py:{cat} --workdir={root}/{cat} "
                    "--config.data_dir=/d/mvtec --config.anomaly_source_path=/d/dtd --config.batch_size=16")
  assert calls[-1] == f"CUDA=all -m draem_jax.summary --root={root} --overwrite"
  assert out.stdout.count("done: ") == 15


def test_mvtec_all_one_category_per_gpu(tmp_path):
  env, log = _stubs(tmp_path)
  out = subprocess.run(["bash", str(LAUNCH / "mvtec_all.sh"), "/d/mvtec", "/d/dtd", str(tmp_path / "r")],
                       env={**env, "PARALLEL_GPUS": "4"}, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  gpu_of = {c.split()[3].split(":")[1]: c.split()[0] for c in log.read_text().splitlines()
            if "draem_jax.train" in c}
  assert gpu_of == {cat: f"CUDA={i % 4}" for i, cat in enumerate(published.CATEGORIES)}


def test_multi_gpu_and_tpu_pod_commands(tmp_path):
  env, log = _stubs(tmp_path)
  subprocess.run(["bash", str(LAUNCH / "multi_gpu.sh"), "grid", "/w/grid", "/d/mvtec", "/d/dtd",
                  "--multihost"], env=env, check=True, timeout=300)
  assert log.read_text().splitlines() == [
      "CUDA=all -m draem_jax.train --config=configs/mvtec.py:grid --workdir=/w/grid "
      "--config.data_dir=/d/mvtec --config.anomaly_source_path=/d/dtd --multihost"]
  log.unlink()
  subprocess.run(["bash", str(LAUNCH / "tpu_pod.sh"), "pod", "zone-a", "wood", "gs://b/wood", "/d/mvtec",
                  "/d/dtd", "--config.batch_size=32"], env=env, check=True, timeout=300)
  train = log.read_text().splitlines()[-1]
  assert train == ("cd draem_jax && python -m draem_jax.train --multihost --config=configs/mvtec.py:wood "
                   "--workdir=gs://b/wood --config.data_dir=/d/mvtec --config.anomaly_source_path=/d/dtd "
                   "--config.batch_size=32")


def test_usage_without_arguments(tmp_path):
  env, _ = _stubs(tmp_path)
  for script in ("mvtec_all.sh", "multi_gpu.sh", "tpu_pod.sh"):
    out = subprocess.run(["bash", str(LAUNCH / script)], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2 and f"launch/{script}" in out.stdout, (script, out.stdout)
