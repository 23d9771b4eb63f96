"""One process of a localhost multi-process run (tests/test_distributed.py).

python tests/helpers/distributed_worker.py PROCESS_ID NUM_PROCESSES PORT DATA_DIR WORKDIR \
    EVAL_WORKDIR OUT [WAIT_FOR]

Run it on CPU devices (JAX_PLATFORMS=cpu, and
XLA_FLAGS=--xla_force_host_platform_device_count=N for N devices per process;
tests/conftest.py's `distributed_runs` sets both through `child_env`).

Trains the `:test` preset (a smaller network: this is about distribution, not
the model) through the real pipeline into WORKDIR, evaluates the checkpoint in
EVAL_WORKDIR, and (process 0) writes the trained parameters and the evaluation
table to OUT.npz/json. WAIT_FOR (a file path): evaluate only once it exists,
i.e. once another run that writes it has finished with EVAL_WORKDIR.
"""

import importlib.util
import json
import os
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_run_file(name: str):
  """configs/<name>.py loaded by its path, as --config=configs/<name>.py does:
  the run files are not a package on sys.path."""
  path = os.path.join(REPO_ROOT, "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"run_file_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def main() -> None:
  process_id, num_processes, port = map(int, sys.argv[1:4])
  data_dir, workdir, eval_workdir, out = sys.argv[4:8]
  wait_for = sys.argv[8] if len(sys.argv) > 8 else ""
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if num_processes > 1:
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes, process_id,
                               initialization_timeout=60)
  import numpy as np  # pylint: disable=g-import-not-at-top
  from clevr_jax import evaluation, sharding  # pylint: disable=g-import-not-at-top
  from clevr_jax.training import checkpoints, train  # pylint: disable=g-import-not-at-top

  config = load_run_file("unet_rgb").get_config("test")
  with config.unlocked():
    config.data.data_dir = data_dir
    config.num_epochs = 1
    config.model.depth, config.model.base_width = 2, 4
    # Adam's first updates are g/|g|: float noise in near-zero gradients (the
    # cross-process all-reduce sums in another order) would flip whole updates.
    config.optimizer.eps = 1.0
    config.eval.taps = ("input", "output")
    # One plain segmenter and one post-processing one (components, absorbing,
    # merging on each device, tables exchanged between processes).
    config.eval.segmenter_names = ("kmeans", "split_merge_predict_k")
  train.train_and_evaluate(config, workdir)
  deadline = time.monotonic() + 540  # under the test's timeout
  while wait_for and not os.path.exists(wait_for):
    if time.monotonic() > deadline:
      raise TimeoutError(f"{wait_for} never appeared")
    time.sleep(0.5)
  results = evaluation.evaluate(config, eval_workdir)
  state, _ = checkpoints.restore_model(config, workdir, sharding.make_mesh())
  leaves = jax.tree.leaves(jax.tree.map(np.asarray, (state.params, state.batch_stats)))
  if jax.process_index() == 0:
    np.savez(out + ".npz", *leaves)
    with open(out + ".json", "w") as f:
      json.dump({"segmenters": results["segmenters"], "devices": jax.device_count(),
                 "processes": jax.process_count()}, f)


if __name__ == "__main__":
  main()
