"""MeanFlow against its teacher on the demo corpus: event accuracy (both demo evaluators) and FD, per demo seed.

  python scripts/meanflow_eval.py --workdirs outputs/demo_s0,outputs/demo_s1,outputs/demo_s2 [--steps 1,2,4]

Each workdir is a finished `make demo` / `star-jax demo` run (one per seed: its records, stage2/ and bundle/).
For each, this fine-tunes the `meanflow` stage from its stage2/ (into meanflow/, resumable; `--set` overrides the
config, e.g. --set meanflow.steps=1000), exports meanflow_bundle/, generates every test query with the teacher at
its default steps with CFG and with the mean-flow model at each of `--steps`, and scores them with the demo's two
evaluators (trained on the real training clips; the second has also heard the VAE's reconstructions) and the
Fréchet distance in the first one's embedding. Prints one table (rows: sampler; columns: figure x workdir, then the
teacher's seed-to-seed range) and writes the figures to `--json`. The goal (docs/meanflow.md): 1 step inside the
teacher's seed-to-seed range on every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FIGURES = ("accuracy", "accuracy_vae_aware", "fd")


def score_samplers(teacher, student, train: dict, queries: dict, steps: list[int], seed: int = 0,
                   batch_size: int = 16) -> dict:
  """Teacher (Euler + CFG, its defaults) and student (mean flow at each of `steps`) on the queries -> {sampler:
  {accuracy, accuracy_vae_aware, fd, seconds}}; `train`/`queries`: split arrays (audio, labels; speech)."""
  from star_jax.demo.evaluator import Evaluator, event_hits
  from star_jax.metrics.scores import frechet_distance

  evaluator = Evaluator(teacher.sample_rate_hz).fit(train["audio"], train["labels"])
  recon = np.concatenate([teacher.reconstruct(train["audio"][i:i + 64]) for i in range(0, len(train["audio"]), 64)])
  vae_evaluator = evaluator.extended(recon, train["labels"])
  real_emb = evaluator.embed(queries["audio"])
  seconds = queries["audio"].shape[1] / teacher.sample_rate_hz
  speech = [s[m] for s, m in zip(queries["speech"], queries["speech_mask"])]
  tokens = np.concatenate([np.asarray(teacher.tokens(speech[i:i + batch_size]))
                           for i in range(0, len(speech), batch_size)])
  samplers = [(f"teacher: Euler {teacher.cfg.flow.num_steps} steps + CFG {teacher.cfg.flow.cfg_scale:g}", teacher, {})]
  samplers += [(f"mean flow, {n} step{'s' * (n > 1)}", student, {"steps": n}) for n in steps]
  out = {}
  for name, gen, kw in samplers:
    gen.sample(tokens[:batch_size], seconds, seed=seed, **kw)  # compile outside the timing
    start = time.perf_counter()
    wavs = np.concatenate([gen.sample(tokens[i:i + batch_size], seconds, seed=seed + i, **kw)
                           for i in range(0, len(tokens), batch_size)])
    elapsed = time.perf_counter() - start
    out[name] = {"accuracy": float(event_hits(evaluator, wavs, queries["labels"]).mean()),
                 "accuracy_vae_aware": float(event_hits(vae_evaluator, wavs, queries["labels"]).mean()),
                 "fd": float(frechet_distance(evaluator.embed(wavs), real_emb)),
                 "seconds": elapsed}
  return out


def fine_tune(workdir: str, overrides: list[str]) -> str:
  """Train `meanflow` from workdir/stage2 into workdir/meanflow (resumes) and export it -> the bundle path."""
  from star_jax.config import load_config
  from star_jax.export import export_bundle, read_run_config
  from star_jax.train import loop
  from star_jax.train.stage import RecordData, build_stage

  stage2 = os.path.join(workdir, "stage2")
  run_cfg = read_run_config(stage2)
  cfg = load_config(f"configs/star.py:{run_cfg.variant}", [f"data.path={run_cfg.data.path}",
                                                            f"meanflow.init_stage2={stage2}", *overrides])
  data = RecordData(cfg)
  loop.train(cfg, build_stage(cfg, "meanflow", data), os.path.join(workdir, "meanflow"), data)
  return export_bundle(os.path.join(workdir, "meanflow"), os.path.join(workdir, "meanflow_bundle"))


def table(results: dict[str, dict]) -> str:
  """Markdown: one row per sampler; per figure, one column per seed and the range over seeds."""
  seeds = list(results)
  samplers = list(results[seeds[0]])
  head = [f"{f} {s}" for f in FIGURES for s in seeds] + [f"{f} range" for f in FIGURES]
  lines = ["| sampler | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
  for name in samplers:
    cells = [f"{results[s][name][f]:.3f}" for f in FIGURES for s in seeds]
    cells += [f"{min(results[s][name][f] for s in seeds):.3f}-{max(results[s][name][f] for s in seeds):.3f}"
              for f in FIGURES]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdirs", required=True, help="comma list of finished demo workdirs (one per seed)")
  p.add_argument("--steps", default="1,2,4", help="mean-flow steps to score")
  p.add_argument("--max-queries", type=int, default=0, help="score this many test queries (0: all)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (meanflow stage)")
  p.add_argument("--json", default="", help="write the figures here")
  args = p.parse_args(argv)

  from star_jax.config import load_config
  from star_jax.demo.run import split_arrays, spread
  from star_jax.export import read_run_config
  from star_jax.generate import Generator

  results = {}
  for workdir in args.workdirs.split(","):
    student_bundle = fine_tune(workdir, args.set)
    run_cfg = read_run_config(os.path.join(workdir, "stage2"))
    cfg = load_config(f"configs/star.py:{run_cfg.variant}", [f"data.path={run_cfg.data.path}"])
    queries = spread(split_arrays(cfg, "test"), args.max_queries or None)
    results[os.path.basename(os.path.normpath(workdir))] = score_samplers(
        Generator(os.path.join(workdir, "bundle")), Generator(student_bundle), split_arrays(cfg, "train"), queries,
        [int(n) for n in args.steps.split(",")])
  print(table(results))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
