"""One process of a multi-process data-parallel training run on the CPU (used by test_multiprocess.py).

  python multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT DEVICES_PER_PROCESS

With NUM_PROCESSES=1 it runs the same computation in one process with the same total device count. Prints
one JSON line {"losses": [...], "batch_stats_sum": ...} from process 0 (every process computes the same
replicated values).
"""

import json
import os
import sys
import traceback

os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

pid, nproc, port, per_process = map(int, sys.argv[1:5])
jax.config.update("jax_num_cpu_devices", per_process)
if nproc > 1:
  jax.distributed.initialize(f"localhost:{port}", nproc, pid, initialization_timeout=90)

import numpy as np  # noqa: E402

from draem_jax import parallel  # noqa: E402
from draem_jax import recipes  # noqa: E402
from draem_jax import steps  # noqa: E402
from draem_jax import synthesis  # noqa: E402

SIZE, BATCH, NUM_STEPS = 32, 8, 3


def main():
  config = recipes.tiny()
  config.update(dict(batch_size=BATCH, num_epochs=10, learning_rate=1e-3, image_size=SIZE))
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (12, SIZE, SIZE, 3), dtype=np.uint8)
  sources = rng.integers(0, 256, (4, SIZE, SIZE, 3), dtype=np.uint8)

  mesh = parallel.make_mesh()
  repl = parallel.replicated(mesh)
  model = steps.build_model(config)
  schedule = steps.learning_rate_schedule(config, len(images))
  tx = steps.make_optimizer(schedule)
  key = jax.jit(jax.random.key, out_shardings=repl)(0)
  state = jax.jit(lambda k: steps.create_train_state(model, tx, k, (SIZE, SIZE)),
                  out_shardings=repl)(key)
  step_fn = steps.jit_train_step(mesh, model=model, tx=tx, synthesis_config=synthesis.SynthesisConfig(),
                                 schedule=schedule, batch_size=BATCH, data_seed=0)
  images, sources = parallel.replicate(images, mesh), parallel.replicate(sources, mesh)
  losses = []
  for _ in range(NUM_STEPS):
    state, metrics = step_fn(state, images, sources)
    losses.append(float(jax.device_get(metrics["loss"])))
  stats = float(sum(np.sum(np.asarray(x)) for x in jax.tree.leaves(jax.device_get(state.batch_stats))))
  if pid == 0:
    print(json.dumps({"losses": losses, "batch_stats_sum": stats,
                      "devices": jax.device_count(), "processes": jax.process_count()}), flush=True)
  if nproc > 1:
    jax.distributed.shutdown()


if __name__ == "__main__":
  try:
    main()
  except BaseException:
    # At once: raised, the error would wait 300 s at jax.distributed's shutdown barrier for the other
    # process, which waits in a collective for this one.
    traceback.print_exc()
    sys.stderr.flush()
    os._exit(1)
