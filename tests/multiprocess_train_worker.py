"""One process of a multi-process ``draem_jax.train`` run on the CPU (used by test_multiprocess.py).

  python multiprocess_train_worker.py PROCESS_ID NUM_PROCESSES PORT WORKDIR DATA_DIR

Trains the tiny recipe (20 steps, a checkpoint every 4) through ``train.run``, the program's runner, so
the exit codes and the one-line errors are the command's; then process 0 prints one JSON line with the
final checkpoint's step and a digest of its variables (restored with the run's own topology).
"""

import hashlib
import json
import os
import sys
import time

os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

pid, nproc, port = map(int, sys.argv[1:4])
workdir, data_dir = sys.argv[4:6]
jax.config.update("jax_num_cpu_devices", 2)
jax.distributed.initialize(f"localhost:{port}", nproc, pid, initialization_timeout=90)

import numpy as np  # noqa: E402

from draem_jax import parallel  # noqa: E402
from draem_jax import recipes  # noqa: E402
from draem_jax import rundir  # noqa: E402
from draem_jax import train  # noqa: E402

if __name__ == "__main__":
  # The last process builds its state late (TEST_SLOW_STATE_S), like a loaded host: gloo's first
  # collective (the checkpoint manager's, after the state) waits only 30 s for it, so this fails unless
  # the processes meet at a barrier first.
  slow_state_s = float(os.environ.get("TEST_SLOW_STATE_S", "0"))
  if pid == nproc - 1 and slow_state_s:
    initial_state = train._initial_state

    def slow_initial_state(*args, **kwargs):
      time.sleep(slow_state_s)
      return initial_state(*args, **kwargs)

    train._initial_state = slow_initial_state
  config = recipes.tiny()
  config.data_dir = data_dir
  config.num_epochs = 5  # 20 steps: the kill (after checkpoint 4) lands well before the end
  train.run(config, workdir)
  repl = parallel.replicated(parallel.make_mesh())
  _, variables, step = rundir.restore_model(workdir, rundir.load_config(workdir), sharding=repl)
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(variables):
    digest.update(np.asarray(leaf.addressable_data(0)).tobytes())
  if pid == 0:
    print(json.dumps({"step": int(step), "sha256": digest.hexdigest()}), flush=True)
  jax.distributed.shutdown()
