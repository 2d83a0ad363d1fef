"""Helpers every bench script shares: timing, the matmul peak that MFU divides by, XLA's FLOP count, the
machine line printed above each table.

Bench scripts put the repository root on sys.path and import this as `bench.common`.
"""

from __future__ import annotations

import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp


def best_time(fn, *args, reps: int) -> float:
  """Fastest of `reps` calls of `fn(*args)` after one untimed call (which compiles)."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return min(times)


def median_time(fn, repeats: int, warmup: int = 1) -> float:
  """Median wall time of `repeats` calls of `fn()` (which blocks on its own result) after `warmup` calls."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def matmul_peak(dtype, n: int = 2048, reps: int = 5) -> float:
  """Best FLOP/s of an n^3 matmul with `dtype` inputs and an f32 accumulator: the MFU denominator."""
  a = jax.random.normal(jax.random.key(0), (n, n)).astype(dtype)
  f = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32)).lower(a, a).compile()
  return 2 * n ** 3 / best_time(f, a, a, reps=reps)


def flops_of(compiled) -> float:
  """FLOPs of a compiled XLA computation (its cost analysis; NaN when the backend gives none)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
  return float((cost or {}).get("flops", float("nan")))


def machine_line() -> str:
  """'# CPU, N cores, platform x devices, jax version, load average' for the top of a table."""
  return (f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {jax.devices()[0].platform} x "
          f"{jax.device_count()}, jax {jax.__version__}; load average {os.getloadavg()[0]:.1f}")
