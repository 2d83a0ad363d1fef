"""Multi-host start-up: initialise `jax.distributed` once, before any device query.

Where the process group comes from, first match wins:
  1. explicit arguments (`--coordinator host:port --num-processes N --process-id I`),
  2. the environment `STAR_COORDINATOR`, `STAR_NUM_PROCESSES`, `STAR_PROCESS_ID` (what launch/local.sh sets),
  3. Slurm (`srun`): `SLURM_NTASKS`, `SLURM_PROCID`, `SLURM_LOCALID`, `SLURM_STEP_NODELIST`, `SLURM_JOB_ID`,
  4. a Cloud TPU VM (pods and single hosts): JAX reads the worker list from the TPU metadata itself.
Anything else is one process, and `initialize` does nothing. See docs/scaling.md ("Multi-host"),
docs/pod.md and launch/.

A process that dies (SIGKILL, a lost host) is noticed by the others through JAX's coordination service
within `STAR_HEARTBEAT_TIMEOUT_S` seconds (default 100, JAX's): they exit non-zero naming the lost task.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import re
from typing import Sequence

from star_jax.errors import UserError

ENV_COORDINATOR = "STAR_COORDINATOR"
ENV_NUM_PROCESSES = "STAR_NUM_PROCESSES"
ENV_PROCESS_ID = "STAR_PROCESS_ID"
ENV_HEARTBEAT_TIMEOUT_S = "STAR_HEARTBEAT_TIMEOUT_S"
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_STEP_NODELIST")
# TPU chips on a Cloud TPU VM: Google's PCI vendor id with one of these device ids (v3 .. v7x); the
# same vendor also makes the gVNIC network card of ordinary GPU VMs, hence the device check.
_GOOGLE_PCI_VENDOR = "0x1ae0"
_TPU_PCI_DEVICES = ("0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076")


@dataclasses.dataclass(frozen=True)
class ProcessGroup:
  """How this process joins the job; `source` is explicit | env | slurm | tpu | single."""
  source: str
  num_processes: int = 1
  process_id: int = 0
  coordinator: str | None = None
  local_device_ids: tuple[int, ...] | None = None


_joined: ProcessGroup | None = None


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None,
               local_device_ids: Sequence[int] | None = None) -> ProcessGroup:
  """Join the multi-process job (a no-op for one process; safe to call twice) -> the group joined."""
  global _joined
  import jax  # imported here so `star-jax --help` stays instant; importing does not query devices

  if _joined is not None:
    return _joined
  group = resolve(coordinator, num_processes, process_id, local_device_ids)
  if group.source == "single" or jax.distributed.is_initialized():
    _joined = group
    return group
  ids = list(group.local_device_ids) if group.local_device_ids is not None else None
  timeout = _int_env(os.environ, ENV_HEARTBEAT_TIMEOUT_S)
  extra = {} if timeout is None else {"heartbeat_timeout_seconds": timeout}
  try:
    if group.source == "tpu":
      jax.distributed.initialize(local_device_ids=ids, **extra)  # JAX reads the pod's worker list from metadata
    else:
      jax.distributed.initialize(group.coordinator, group.num_processes, group.process_id,
                                 local_device_ids=ids, cluster_detection_method="deactivate", **extra)
  except RuntimeError as e:
    if "before" in str(e):  # JAX: "must be called before any JAX computations are executed"
      raise UserError("star_jax.distributed.initialize() must run before anything queries JAX devices "
                      "(jax.devices(), a mesh, an array); call it first thing in main") from e
    raise
  if group.source == "tpu":
    group = dataclasses.replace(group, num_processes=jax.process_count(), process_id=jax.process_index())
  _joined = group
  return group


def await_lost_process(error: Exception) -> None:
  """After a step failed in a multi-process job (a collective with a dead process fails at once): wait for
  JAX's coordination service, which ends this process with a line naming the lost task once it misses its
  heartbeats; returns (and the caller re-raises) when no verdict comes, as for an error of this process."""
  import sys
  import time

  import jax
  if jax.process_count() == 1:
    return
  wait_s = (_int_env(os.environ, ENV_HEARTBEAT_TIMEOUT_S) or 100) + 15
  first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
  print(f"star-jax: process {jax.process_index()}: a step failed ({first_line}); waiting up to {wait_s} s for "
        f"the coordination service to name a lost process", file=sys.stderr, flush=True)
  time.sleep(wait_s)


def resolve(coordinator: str | None = None, num_processes: int | None = None,
            process_id: int | None = None, local_device_ids: Sequence[int] | None = None,
            environ: dict[str, str] | None = None) -> ProcessGroup:
  """Work out the process group from arguments, then STAR_*, Slurm and TPU environments; no side effects."""
  env = os.environ if environ is None else environ
  ids = tuple(local_device_ids) if local_device_ids is not None else None
  source = "explicit" if any(v is not None for v in (coordinator, num_processes, process_id)) else None
  coordinator = coordinator if coordinator is not None else env.get(ENV_COORDINATOR) or None
  num_processes = num_processes if num_processes is not None else _int_env(env, ENV_NUM_PROCESSES)
  process_id = process_id if process_id is not None else _int_env(env, ENV_PROCESS_ID)
  if source is None and any(v is not None for v in (coordinator, num_processes, process_id)):
    source = "env"

  if source is not None:
    if num_processes in (None, 1):
      if num_processes is None and (coordinator is not None or process_id not in (None, 0)):
        raise UserError(f"distributed: --num-processes (or {ENV_NUM_PROCESSES}) is required with "
                        f"--coordinator/--process-id")
      return ProcessGroup("single", local_device_ids=ids)
    if coordinator is None or process_id is None:
      raise UserError(f"distributed: {num_processes} processes need --coordinator host:port and "
                      f"--process-id (or {ENV_COORDINATOR} and {ENV_PROCESS_ID})")
    if not 0 <= process_id < num_processes:
      raise UserError(f"distributed: process id {process_id} is outside 0..{num_processes - 1}")
    if ":" not in coordinator:
      raise UserError(f"distributed: coordinator '{coordinator}' must be host:port")
    return ProcessGroup(source, num_processes, process_id, coordinator, ids)

  if all(v in env for v in _SLURM_VARS) and int(env["SLURM_NTASKS"]) > 1:
    return _slurm_group(env, ids)
  if _on_cloud_tpu_vm(env):
    return ProcessGroup("tpu", local_device_ids=ids)
  return ProcessGroup("single", local_device_ids=ids)


def _int_env(env, name: str) -> int | None:
  value = env.get(name)
  if value in (None, ""):
    return None
  try:
    return int(value)
  except ValueError:
    raise UserError(f"distributed: {name}={value!r} is not an integer") from None


def _slurm_group(env, ids: tuple[int, ...] | None) -> ProcessGroup:
  """One process per GPU (tasks per node > 1: each task takes GPU SLURM_LOCALID) or one per node (all GPUs)."""
  port = env.get("JAX_COORDINATOR_PORT") or str(int(env["SLURM_JOB_ID"]) % 4096 + 61440)
  coordinator = f"{first_slurm_host(env['SLURM_STEP_NODELIST'])}:{port}"
  if ids is None and _tasks_on_this_node(env) > 1 and len(_visible_gpus(env)) != 1:
    ids = (int(env["SLURM_LOCALID"]),)
  return ProcessGroup("slurm", int(env["SLURM_NTASKS"]), int(env["SLURM_PROCID"]), coordinator, ids)


def first_slurm_host(nodelist: str) -> str:
  """'gpu[003-010,012],cpu1' -> 'gpu003': the job's first host, which runs process 0."""
  m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
  if not m:
    raise UserError(f"distributed: cannot parse SLURM_STEP_NODELIST={nodelist!r}")
  prefix, ranges = m.groups()
  return prefix + (re.split(r"[,-]", ranges)[0] if ranges else "")


def _tasks_on_this_node(env) -> int:
  # SLURM_STEP_TASKS_PER_NODE looks like '8(x2)'; launch/slurm_gpu.sbatch asks for equal nodes.
  raw = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_STEP_TASKS_PER_NODE", "1")
  return int(re.match(r"\d+", raw).group())


def _visible_gpus(env) -> list[str]:
  raw = env.get("CUDA_VISIBLE_DEVICES")
  return [] if raw is None else [d for d in raw.split(",") if d]


def _on_cloud_tpu_vm(env) -> bool:
  if env.get("TPU_WORKER_HOSTNAMES") or env.get("TPU_PROCESS_ADDRESSES"):  # GKE TPU pods
    return True
  for device_dir in glob.glob("/sys/bus/pci/devices/*"):
    try:
      with open(os.path.join(device_dir, "vendor")) as f, open(os.path.join(device_dir, "device")) as g:
        if f.read().strip() == _GOOGLE_PCI_VENDOR and g.read().strip() in _TPU_PCI_DEVICES:
          return True
    except OSError:
      continue
  return False


def add_distributed_arguments(parser: argparse.ArgumentParser) -> None:
  """--coordinator/--num-processes/--process-id for a multi-process CLI (default: from the environment)."""
  g = parser.add_argument_group("multi-host (default: Slurm / TPU pod / STAR_* environment)")
  g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                 help=f"address of process 0 (default: ${ENV_COORDINATOR}, Slurm's first host, TPU metadata)")
  g.add_argument("--num-processes", type=int, default=None, metavar="N",
                 help=f"processes in the job (default: ${ENV_NUM_PROCESSES}, SLURM_NTASKS, or 1)")
  g.add_argument("--process-id", type=int, default=None, metavar="I",
                 help=f"this process's index 0..N-1 (default: ${ENV_PROCESS_ID}, SLURM_PROCID)")


def initialize_from_args(args: argparse.Namespace) -> ProcessGroup:
  """`initialize` with the flags that `add_distributed_arguments` added."""
  return initialize(args.coordinator, args.num_processes, args.process_id)
