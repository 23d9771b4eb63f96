"""One process of `--mode=score_features` and `--mode=score_masks` on however many
devices and processes (tests/test_external.py).

python tests/helpers/external_worker.py PROCESS_ID NUM_PROCESSES PORT DATA_DIR FEATURES MASKS OUT

Run it on CPU devices (JAX_PLATFORMS=cpu, and
XLA_FLAGS=--xla_force_host_platform_device_count=N for N devices per process).
Scores FEATURES and MASKS with the `unet_rgb:test` config and (process 0) writes
both tables, the device count and the process count to OUT.json.
"""

import json
import os
import sys
import tempfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
  process_id, num_processes, port = map(int, sys.argv[1:4])
  data_dir, features, masks, out = sys.argv[4:8]
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if num_processes > 1:
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes, process_id,
                               initialization_timeout=60)
  sys.path.insert(0, REPO_ROOT)
  from clevr_jax import evaluation  # pylint: disable=g-import-not-at-top
  from configs import unet_rgb  # pylint: disable=g-import-not-at-top

  config = unet_rgb.get_config("test")
  config.data.data_dir = data_dir
  with tempfile.TemporaryDirectory() as scratch:
    scored = evaluation.score_features(config, features, os.path.join(scratch, "f"))
    masked = evaluation.score_masks(config, masks, os.path.join(scratch, "m"))
  if jax.process_index() == 0:
    with open(out + ".json", "w") as f:
      json.dump({"segmenters": scored["segmenters"], "masks": masked["masks"],
                 "devices": jax.device_count(), "processes": jax.process_count()}, f)


if __name__ == "__main__":
  main()
