"""The launch scripts, through their dry runs and with fake gcloud / srun / python.

Nothing here needs a cluster, a TPU, a GPU or JAX: each script runs under bash in a
subprocess, and what it prints (or what the fakes record) is parsed back with shlex.
"""

from __future__ import annotations

import os
import pathlib
import shlex
import shutil
import subprocess
import textwrap
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LOCAL = REPO / "launch" / "local.sh"
TPU = REPO / "launch" / "tpu_vm.sh"
SLURM = REPO / "launch" / "gpu_slurm.sbatch"
DRY = "[dry-run] "

pytestmark = pytest.mark.slow  # each test runs a launch script in a child bash

# Variables the scripts read: tests start from none of them, whatever the caller's shell has.
_SCRIPT_VARS = {
    "CONFIG", "WORKDIR", "DATA_DIR", "MODE", "PREPARE", "PYTHON", "REPO_DIR", "DRY_RUN",
    "GPUS_PER_NODE", "CUDA_VISIBLE_DEVICES", "XLA_FLAGS", "XLA_PYTHON_CLIENT_MEM_FRACTION",
    "NCCL_DEBUG", "JAX_LOCAL_DEVICE_IDS",
}


def _env(**overrides: str) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items()
         if k not in _SCRIPT_VARS and not k.startswith(("SLURM_", "TPU_"))}
  env.update(overrides)
  return env


def run(script: pathlib.Path, *args: str, env: dict[str, str] | None = None,
        cwd: pathlib.Path = REPO, timeout: float = 30) -> subprocess.CompletedProcess:
  return subprocess.run(["bash", str(script), *args], cwd=cwd, env=env or _env(),
                        capture_output=True, text=True, timeout=timeout)


def dry_commands(stdout: str) -> list[list[str]]:
  """The commands of a dry run, as argument lists."""
  return [shlex.split(line[len(DRY):]) for line in stdout.splitlines()
          if line.startswith(DRY)]


def flag(cmd: list[str], name: str) -> str | None:
  """The value of --name=VALUE in cmd (the last one, as absl reads it)."""
  values = [a.split("=", 1)[1] for a in cmd if a.startswith(f"--{name}=")]
  return values[-1] if values else None


def write_exe(path: pathlib.Path, text: str) -> pathlib.Path:
  path.write_text(textwrap.dedent(text).lstrip())
  path.chmod(0o755)
  return path


# --------------------------------------------------------------------------- local.sh

def _main_commands(stdout: str) -> list[list[str]]:
  return [c for c in dry_commands(stdout) if "clevr_jax.main" in c]


def test_local_dry_run_cpu_gives_n_processes_one_coordinator():
  res = run(LOCAL, "--dry-run", "--num-processes", "3", "--devices-per-process", "2",
            "--config", "configs/unet_rgb.py:quick", "--workdir", "/tmp/lw",
            "--data-dir=/tmp/tfds", "--", "--config.batch_size=12")
  assert res.returncode == 0, res.stderr
  cmds = _main_commands(res.stdout)
  assert len(cmds) == 3
  assert sorted(flag(c, "process_id") for c in cmds) == ["0", "1", "2"]
  assert {flag(c, "num_processes") for c in cmds} == {"3"}
  addresses = {flag(c, "coordinator_address") for c in cmds}
  assert len(addresses) == 1 and addresses.pop().startswith("127.0.0.1:")
  logs = set()
  for c in cmds:
    assert c[0] == "env"
    assert "JAX_PLATFORMS=cpu" in c
    assert "JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo" in c
    assert "XLA_FLAGS=--xla_force_host_platform_device_count=2" in c
    assert flag(c, "config") == "configs/unet_rgb.py:quick"
    assert flag(c, "workdir") == "/tmp/lw"
    assert flag(c, "mode") == "train"
    assert flag(c, "config.data.data_dir") == "/tmp/tfds"
    assert flag(c, "config.batch_size") == "12"
    logs.add(c[c.index(">") + 1])
  assert len(logs) == 3 and all(p.startswith("/tmp/lw/") for p in logs)


def test_local_keeps_callers_xla_flags():
  res = run(LOCAL, "--dry-run", "--config", "c.py", "--workdir", "/tmp/lw",
            env=_env(XLA_FLAGS="--xla_dump_to=/tmp/d"))
  cmd = _main_commands(res.stdout)[0]
  assert ("XLA_FLAGS=--xla_dump_to=/tmp/d --xla_force_host_platform_device_count=1"
          in cmd)


def test_local_dry_run_gpu_carves_the_visible_gpus():
  res = run(LOCAL, "--dry-run", "--platform", "gpu", "--devices-per-process", "2",
            "--config", "configs/unet_rgb.py", "--workdir", "/tmp/lw",
            env=_env(CUDA_VISIBLE_DEVICES="4,5,6,7"))
  assert res.returncode == 0, res.stderr
  cmds = _main_commands(res.stdout)
  assert [flag(c, "process_id") for c in cmds] == ["0", "1"]
  assert [next(a for a in c if a.startswith("CUDA_VISIBLE_DEVICES=")) for c in cmds] == [
      "CUDA_VISIBLE_DEVICES=4,5", "CUDA_VISIBLE_DEVICES=6,7"]
  assert not any("JAX_PLATFORMS=cpu" in c for c in cmds)


def test_local_gpu_refuses_more_gpus_than_visible():
  res = run(LOCAL, "--dry-run", "--platform", "gpu", "--num-processes", "3",
            "--config", "c.py", "--workdir", "/tmp/lw", env=_env(CUDA_VISIBLE_DEVICES="0,1"))
  assert res.returncode == 2
  assert "only 2 visible" in res.stderr


@pytest.mark.parametrize("args, message", [
    (["--workdir", "/tmp/lw"], "--config is required"),
    (["--config", "c.py"], "--workdir is required"),
    (["--config", "c.py", "--workdir", "/tmp/lw", "--bogus"], "unknown argument: --bogus"),
    (["--config", "c.py", "--workdir", "/tmp/lw", "--num-processes", "two"], "positive integer"),
])
def test_local_usage_errors(args, message):
  res = run(LOCAL, "--dry-run", *args)
  assert res.returncode == 2
  assert message in res.stderr and "--help" in res.stderr
  assert not dry_commands(res.stdout)


_FAKE_PYTHON = """
    #!/usr/bin/env bash
    # Stands in for python: records its arguments and pid, then behaves as told.
    for a in "$@"; do case "$a" in --process_id=*) id="${a#*=}" ;; esac; done
    printf '%s\\n' "$@" > "$FAKE_DIR/args_$id"
    echo $$ > "$FAKE_DIR/pid_$id"
    echo "hello from process $id"
    if [[ "$id" == "${FAKE_FAIL_ID:-none}" ]]; then exit 3; fi
    exec sleep "${FAKE_SLEEP:-0}"
"""


def test_local_runs_all_processes_with_a_real_free_port(tmp_path):
  fake = write_exe(tmp_path / "python", _FAKE_PYTHON)
  workdir = tmp_path / "run"
  res = run(LOCAL, "--python", str(fake), "--num-processes", "2", "--config", "c.py",
            "--workdir", str(workdir), env=_env(FAKE_DIR=str(tmp_path)))
  assert res.returncode == 0, res.stderr
  args = [(tmp_path / f"args_{i}").read_text().split("\n") for i in range(2)]
  ports = {flag(a, "coordinator_address") for a in args}
  assert len(ports) == 1
  port = ports.pop().removeprefix("127.0.0.1:")
  assert port.isdigit() and 0 < int(port) < 65536
  for i in range(2):
    assert f"hello from process {i}" in (workdir / "launch_logs" / f"process_{i}.log").read_text()


def test_local_first_failure_stops_the_others(tmp_path):
  fake = write_exe(tmp_path / "python", _FAKE_PYTHON)
  start = time.monotonic()
  res = run(LOCAL, "--python", str(fake), "--num-processes", "3", "--config", "c.py",
            "--workdir", str(tmp_path / "run"),
            env=_env(FAKE_DIR=str(tmp_path), FAKE_FAIL_ID="1", FAKE_SLEEP="60"))
  elapsed = time.monotonic() - start
  assert res.returncode == 3
  assert elapsed < 20
  assert "process 1 failed with exit code 3" in res.stderr
  for i in (0, 2):
    # A process the launcher stopped before it wrote its pid never ran the command.
    pid_file = tmp_path / f"pid_{i}"
    assert not pid_file.exists() or not _running(int(pid_file.read_text()))


def _running(pid: int) -> bool:
  """Whether pid runs (a zombie awaiting its reaper does not)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  stat = pathlib.Path(f"/proc/{pid}/stat")
  try:
    return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
  except (FileNotFoundError, IndexError):
    return not stat.parent.parent.exists()  # no /proc: trust os.kill


# --------------------------------------------------------------------------- tpu_vm.sh

def _tpu(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
  return run(TPU, "--name", "clevr", "--zone", "us-central2-b", *args, env=env)


def _ssh_commands(cmds: list[list[str]]) -> list[tuple[str, str]]:
  """(worker, remote command) of each `gcloud ... ssh`."""
  return [(flag(c, "worker"), flag(c, "command")) for c in cmds if c[:5] == [
      "gcloud", "compute", "tpus", "tpu-vm", "ssh"]]


def test_tpu_dry_run_multi_host(tmp_path):
  # A gcloud that leaves a trace if the dry run calls it.
  write_exe(tmp_path / "gcloud", "#!/bin/sh\ntouch \"$(dirname \"$0\")/called\"\n")
  env = _env(PATH=f"{tmp_path}:{os.environ['PATH']}")
  res = _tpu("--dry-run", "--accelerator-type", "v4-32", "--project", "proj",
             "--config", "configs/ae_rgb.py:synthetic", "--workdir", "gs://bucket/runs/ae",
             "--data-dir", "gs://bucket/tfds", "--",
             "--config.batch_size=16", env=env)
  assert res.returncode == 0, res.stderr
  assert not (tmp_path / "called").exists()
  cmds = dry_commands(res.stdout)
  assert all(c[0] in ("gcloud", "tar") for c in cmds)
  for c in cmds:
    if c[0] == "gcloud":
      assert flag(c, "zone") == "us-central2-b" and flag(c, "project") == "proj"
  create = next(c for c in cmds if c[3:5] == ["tpu-vm", "create"])
  assert flag(create, "accelerator-type") == "v4-32"
  assert flag(create, "version") == "tpu-ubuntu2204-base"

  ssh = _ssh_commands(cmds)
  assert any(w == "all" and "pip install" in c and ".[tpu]" in c for w, c in ssh)
  train = [shlex.split(c) for w, c in ssh if w == "all" and "clevr_jax.main" in c]
  assert len(train) == 1
  main = train[0]
  assert "--distributed" in main
  assert flag(main, "mode") == "train"
  assert flag(main, "config") == "configs/ae_rgb.py:synthetic"
  assert flag(main, "workdir") == "gs://bucket/runs/ae"
  assert flag(main, "config.data.data_dir") == "gs://bucket/tfds"
  assert main[-1] == "--config.batch_size=16"
  # The dataset is built once, on worker 0, before the run and without --distributed.
  prep = [(i, shlex.split(c)) for i, (w, c) in enumerate(ssh) if flag(shlex.split(c), "mode") == "prepare"]
  assert len(prep) == 1 and ssh[prep[0][0]][0] == "0"
  assert "--distributed" not in prep[0][1]
  assert prep[0][0] < [i for i, (w, c) in enumerate(ssh) if "--distributed" in c][0]


@pytest.mark.parametrize("workdir_flag", [
    ["--workdir", "/home/me/runs/unet"],
    ["--workdir", "runs/unet"],
])
def test_tpu_refuses_local_workdir_on_multi_host(workdir_flag):
  res = _tpu("--dry-run", "--accelerator-type", "v5litepod-16", "--config", "c.py",
             *workdir_flag)
  assert res.returncode != 0
  assert "multi-host" in res.stderr and "gs://" in res.stderr
  assert workdir_flag[1] in res.stderr
  assert not dry_commands(res.stdout)


def test_tpu_refuses_local_data_dir_on_multi_host():
  res = _tpu("--dry-run", "--accelerator-type", "v4-16", "--config", "c.py",
             "--workdir", "gs://b/w", "--data-dir", "/data/tfds")
  assert res.returncode != 0 and "--data-dir must be a gs:// path" in res.stderr


def test_tpu_single_host_accepts_a_local_workdir():
  res = _tpu("--dry-run", "--accelerator-type", "v6e-8", "--config", "c.py",
             "--workdir", "runs/local", "--no-prepare")
  assert res.returncode == 0, res.stderr
  cmds = dry_commands(res.stdout)
  create = next(c for c in cmds if c[3:5] == ["tpu-vm", "create"])
  assert flag(create, "version") == "v2-alpha-tpuv6e"
  main = shlex.split([c for w, c in _ssh_commands(cmds) if "--distributed" in c][0])
  assert flag(main, "workdir") == "runs/local"
  assert not any("--mode=prepare" in c for _, c in _ssh_commands(cmds))  # --no-prepare
  assert not any(c[3:5] == ["tpu-vm", "delete"] for c in cmds)


def test_tpu_delete_after():
  res = _tpu("--dry-run", "--config", "c.py", "--workdir", "runs/local", "--delete-after")
  assert res.returncode != 0 and "--delete-after" in res.stderr
  res = _tpu("--dry-run", "--config", "c.py", "--workdir", "gs://b/w", "--delete-after")
  assert res.returncode == 0, res.stderr
  last = dry_commands(res.stdout)[-1]
  assert last[3:6] == ["tpu-vm", "delete", "clevr"] and "--quiet" in last


def test_tpu_repo_url_clones_instead_of_copying():
  res = _tpu("--dry-run", "--config", "c.py", "--workdir", "gs://b/w",
             "--repo-url", "https://example.com/clevr_jax.git", "--ref", "v1.0")
  assert res.returncode == 0, res.stderr
  cmds = dry_commands(res.stdout)
  assert not any(c[0] == "tar" or c[3:5] == ["tpu-vm", "scp"] for c in cmds)
  assert any("git clone --depth=1 --branch v1.0 https://example.com/clevr_jax.git" in c
             for _, c in _ssh_commands(cmds))


@pytest.mark.parametrize("args, message", [
    (["--zone", "z", "--config", "c", "--workdir", "gs://b"], "--name is required"),
    (["--name", "n", "--config", "c", "--workdir", "gs://b"], "--zone is required"),
    (["--name", "n", "--zone", "z", "--workdir", "gs://b"], "--config is required"),
    (["--name", "n", "--zone", "z", "--config", "c"], "--workdir is required"),
    (["--name", "n", "--zone", "z", "--config", "c", "--workdir", "gs://b",
      "--accelerator-type", "v4"], "not of the form"),
    (["--name", "n", "--zone", "z", "--config", "c", "--workdir", "gs://b",
      "--mode", "prepare"], "prepared first"),
])
def test_tpu_usage_errors(args, message):
  res = run(TPU, "--dry-run", *args)
  assert res.returncode == 2
  assert message in res.stderr
  assert not dry_commands(res.stdout)


_FAKE_GCLOUD = """
    #!/usr/bin/env bash
    # Records each call; describe answers $FAKE_DESCRIBE or fails as for a missing VM;
    # scp keeps the archive; the training ssh fails when $FAKE_RUN_FAIL is set.
    printf '%s\\n' "$(printf '%q ' "$@")" >> "$FAKE_DIR/calls"
    case "$4" in
      describe) [[ -n "${FAKE_DESCRIBE:-}" ]] || exit 1; printf '%b\\n' "$FAKE_DESCRIBE" ;;
      scp) cp "$5" "$FAKE_DIR/shipped.tar.gz" ;;
      ssh) [[ "$*" != *--distributed* || -z "${FAKE_RUN_FAIL:-}" ]] || exit 7 ;;
    esac
"""


def _fake_gcloud_env(tmp_path: pathlib.Path, **extra: str) -> dict[str, str]:
  write_exe(tmp_path / "gcloud", _FAKE_GCLOUD)
  return _env(PATH=f"{tmp_path}:{os.environ['PATH']}", FAKE_DIR=str(tmp_path), **extra)


def _calls(tmp_path: pathlib.Path) -> list[list[str]]:
  return [shlex.split(line) for line in (tmp_path / "calls").read_text().splitlines()]


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(),
                    reason="ships the checkout with git ls-files")
def test_tpu_real_run_creates_ships_and_deletes_even_on_failure(tmp_path):
  res = _tpu("--config", "c.py", "--workdir", "gs://b/w", "--delete-after",
             env=_fake_gcloud_env(tmp_path, FAKE_RUN_FAIL="1"))
  assert res.returncode == 7, res.stderr
  subs = [c[3] for c in _calls(tmp_path)]
  assert subs == ["describe", "create", "scp", "ssh", "ssh", "ssh", "ssh", "delete"]
  listing = subprocess.run(["tar", "-tzf", str(tmp_path / "shipped.tar.gz")],
                           capture_output=True, text=True, check=True).stdout.split()
  assert "pyproject.toml" in listing and "launch/tpu_vm.sh" in listing
  assert not any(p.startswith((".venv/", ".git/")) for p in listing)


def test_tpu_real_run_reuses_a_ready_vm_and_checks_its_type(tmp_path):
  res = _tpu("--config", "c.py", "--workdir", "w", "--repo-url", "u",
             env=_fake_gcloud_env(tmp_path, FAKE_DESCRIBE="READY\\tv4-8"))
  assert res.returncode == 0, res.stderr
  assert [c[3] for c in _calls(tmp_path)] == ["describe", "ssh", "ssh", "ssh", "ssh"]

  (tmp_path / "calls").unlink()
  res = _tpu("--config", "c.py", "--workdir", "w", "--repo-url", "u",
             env=_fake_gcloud_env(tmp_path, FAKE_DESCRIBE="READY\\tv4-32"))
  assert res.returncode == 2 and "exists as v4-32" in res.stderr
  assert [c[3] for c in _calls(tmp_path)] == ["describe"]


# ------------------------------------------------------------------- gpu_slurm.sbatch

def _slurm_main(stdout: str) -> list[str]:
  mains = [c for c in dry_commands(stdout) if c[0] == "srun" and "--distributed" in c]
  assert len(mains) == 1
  return mains[0]


def _exports(stdout: str) -> dict[str, str]:
  return dict(c[1].split("=", 1) for c in dry_commands(stdout) if c[0] == "export")


def test_slurm_dry_run_outside_slurm_uses_the_header_defaults():
  res = run(SLURM, "--", "--config.batch_size=16",
            env=_env(DRY_RUN="1", WORKDIR="/shared/runs/u", DATA_DIR="/shared/tfds",
                     CONFIG="configs/unet_gray.py"))
  assert res.returncode == 0, res.stderr
  main = _slurm_main(res.stdout)
  assert flag(main, "nodes") == "2" and flag(main, "ntasks") == "2"
  assert flag(main, "ntasks-per-node") == "1"
  assert flag(main, "cpus-per-task") == "16"
  assert main[main.index("-m") + 1] == "clevr_jax.main"
  assert flag(main, "config") == "configs/unet_gray.py"
  assert flag(main, "workdir") == "/shared/runs/u"
  assert flag(main, "config.data.data_dir") == "/shared/tfds"
  assert flag(main, "mode") == "train"
  assert main[-1] == "--config.batch_size=16" and "--" not in main
  env = _exports(res.stdout)
  assert env["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3,4,5,6,7"
  assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.90"
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" in env["XLA_FLAGS"].split()
  assert env["NCCL_DEBUG"] == "WARN"
  assert "multiple of 16" in res.stdout
  # First the shared-filesystem check, then the dataset in one task, then training.
  srun = [c for c in dry_commands(res.stdout) if c[0] == "srun"]
  assert len(srun) == 3 and "bash" in srun[0] and srun[2] == main
  assert flag(srun[1], "ntasks") == "1" and flag(srun[1], "mode") == "prepare"
  assert "--distributed" not in srun[1] and srun[1][-1] == "--config.batch_size=16"


def test_slurm_dry_run_reads_the_allocation():
  res = run(SLURM, env=_env(DRY_RUN="1", WORKDIR="gs://b/w", SLURM_JOB_ID="42",
                            SLURM_JOB_NUM_NODES="4", SLURM_GPUS_PER_NODE="a100:4",
                            SLURM_CPUS_PER_TASK="32", XLA_FLAGS="--xla_dump_to=/tmp/d",
                            XLA_PYTHON_CLIENT_MEM_FRACTION="0.8"))
  assert res.returncode == 0, res.stderr
  main = _slurm_main(res.stdout)
  assert flag(main, "nodes") == "4" and flag(main, "cpus-per-task") == "32"
  env = _exports(res.stdout)
  assert env["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3"
  assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.8"
  assert env["XLA_FLAGS"].split() == [
      "--xla_dump_to=/tmp/d", "--xla_gpu_enable_latency_hiding_scheduler=true"]
  # A gs:// workdir needs no marker file, only the check that the code is everywhere.
  assert not any(c[0] in ("mkdir", "touch") for c in dry_commands(res.stdout))


@pytest.mark.parametrize("env, message", [
    ({"DRY_RUN": "1"}, "WORKDIR is required"),
    ({"WORKDIR": "/shared/w"}, "not inside a SLURM job"),
    ({"DRY_RUN": "1", "WORKDIR": "/shared/w", "MODE": "fit"}, "MODE must be"),
    ({"DRY_RUN": "1", "WORKDIR": "/shared/w", "REPO_DIR": "/"}, "not the clevr_jax repository"),
])
def test_slurm_usage_errors(env, message):
  res = run(SLURM, env=_env(**env))
  assert res.returncode == 2
  assert message in res.stderr
  assert not dry_commands(res.stdout)


_FAKE_SRUN = """
    #!/usr/bin/env bash
    # Records the call and the environment the tasks would get, then runs the task
    # command once here (only for the filesystem check) or fails when told to.
    { printf '%q ' "$@"; echo; echo "JAX_LOCAL_DEVICE_IDS=${JAX_LOCAL_DEVICE_IDS:-}"; } >> "$FAKE_DIR/calls"
    [[ -z "${FAKE_SRUN_FAIL:-}" ]] || exit 1
    while [[ "$1" == --* ]]; do shift; done
    if [[ "$1" == bash ]]; then exec "$@"; fi
"""


def test_slurm_real_run_checks_the_filesystem_then_trains(tmp_path):
  write_exe(tmp_path / "srun", _FAKE_SRUN)
  env = _env(PATH=f"{tmp_path}:{os.environ['PATH']}", FAKE_DIR=str(tmp_path),
             SLURM_JOB_ID="7", SLURM_JOB_NUM_NODES="3", SLURM_GPUS_ON_NODE="2",
             SLURM_CPUS_PER_TASK="8", SLURM_SUBMIT_DIR=str(REPO),
             WORKDIR=str(tmp_path / "w"), PREPARE="0")
  res = run(SLURM, env=env, cwd=tmp_path)
  assert res.returncode == 0, res.stderr
  lines = (tmp_path / "calls").read_text().splitlines()
  calls = [shlex.split(line) for line in lines[0::2]]
  assert len(calls) == 2 and "bash" in calls[0] and "--distributed" in calls[1]
  assert flag(calls[1], "chdir") == str(REPO)
  assert lines[3] == "JAX_LOCAL_DEVICE_IDS=0,1"
  assert list((tmp_path / "w").iterdir()) == []  # the marker file is gone

  (tmp_path / "calls").unlink()
  env["FAKE_SRUN_FAIL"] = "1"
  res = run(SLURM, env=env, cwd=tmp_path)
  assert res.returncode != 0 and "shared filesystem" in res.stderr
  assert len((tmp_path / "calls").read_text().splitlines()) == 2  # no training step


# ------------------------------------------------------------------------ shellcheck

def test_shellcheck_clean():
  # Required, not skipped: .ci/run installs it from the system's packages.
  assert shutil.which("shellcheck"), "shellcheck is required: apt-get install shellcheck"
  # -x from the repository root: follow `source launch/lib.sh` into the shared helpers.
  res = subprocess.run(["shellcheck", "-x", "--shell=bash", str(LOCAL), str(TPU), str(SLURM),
                        str(REPO / "launch" / "lib.sh"), str(REPO / ".ci" / "run")],
                       capture_output=True, text=True, timeout=60, cwd=REPO)
  assert res.returncode == 0, res.stdout + res.stderr
