"""bench/train_throughput.py on the tiny config: one row per input kind, figures consistent (no timing asserts)."""

import json
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))


@pytest.mark.slow
def test_tiny_rows(tmp_path, capsys):
  import train_throughput

  out = tmp_path / "tput.json"
  assert train_throughput.main(["--configs", "tiny", "--dtypes", "float32", "--inputs", "cached,raw",
                                "--steps", "1", "--warmup", "0", "--json", str(out)]) == 0
  assert "| tiny | cached | float32 | 8 x 100 |" in capsys.readouterr().out
  rows = {r["inputs"]: r for r in json.loads(out.read_text())["rows"]}
  for r in rows.values():
    assert r["flops_per_step"] > 0 and math.isfinite(r["loss"])
    assert r["tokens_per_s"] == pytest.approx(r["batch"] * r["frames"] / r["step_s"])
    assert r["mfu"] == pytest.approx(r["flops_per_step"] / r["step_s"] / r["peak_flops_per_s"])
  # Raw inputs run the frozen HuBERT and VAE encoder inside the step.
  assert rows["raw"]["flops_per_step"] > rows["cached"]["flops_per_step"]
