"""`bench/gpu.sh --small`: the accelerator speed check runs end to end at tiny sizes (figures present and finite;
no timing asserts)."""

import os
import re
import subprocess
import sys

from conftest import TEST_XLA_FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_small_runs_every_part():
  env = {**os.environ, "PYTHON": sys.executable, "XLA_FLAGS": TEST_XLA_FLAGS}  # one CPU device
  proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu.sh"), "--small", "--steps", "1", "--reps", "1"],
                        capture_output=True, text=True, env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = proc.stdout
  train = re.search(r"^\| tiny float32 \| 8 x 100 \| .* \| (\d+)% \|$", out, re.M)
  assert train and int(train.group(1)) > 0
  gen = re.findall(r"^\| (Euler 10 steps \+ CFG|mean flow, 1 step|mean flow, 2 steps) \| (\d+) \| [\d.]+ \| "
                   r"([\d.]+) \|", out, re.M)
  assert [(name, int(rows)) for name, rows, _ in gen] == [("Euler 10 steps + CFG", 20), ("mean flow, 1 step", 1),
                                                          ("mean flow, 2 steps", 2)]
  assert all(float(s) > 0 for _, _, s in gen)
  assert re.search(r"^\| float32 \| [\d.]+ \| 35.9 \|$", out, re.M)
