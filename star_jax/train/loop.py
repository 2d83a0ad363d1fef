"""The training loop every stage shares, top to bottom: mesh -> data -> optimizer -> sharded init or
restore -> ahead-of-time compiled step -> loop (log, evaluate, checkpoint, preemption, NaN guard).
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import time
from typing import Any, Callable

import jax
import numpy as np

from star_jax import checkpoint, distributed, paths, sharding
from star_jax.errors import UserError
from star_jax.train import state as state_lib
from star_jax.train.stage import Data, Stage
from star_jax.train.writer import MetricWriter

log = logging.getLogger("star_jax.train")


class TrainingDiverged(RuntimeError):
  """The loss or the gradients became NaN/Inf (train.nan_policy='stop')."""


@dataclasses.dataclass
class Result:
  step: int               # steps completed
  status: str             # "done" | "preempted" | "early_stopped"
  metrics: dict           # the last train metrics written
  best: dict | None = None  # the best evaluation (stages with `evaluate`)


class PreemptionGuard:
  """SIGTERM/SIGINT set a flag the loop checks after every step (it then saves and returns).

  A second SIGINT interrupts at once (KeyboardInterrupt), for a user who really wants out. In a
  multi-process run a signal reaches one process (a preempted host, a `kill`), so `agreed()` gathers the
  flags of all processes after each step: every process then saves the same step and returns.
  """

  def __init__(self):
    self.requested = None  # the signal's name once one arrived
    self._previous = {}

  def _handle(self, signum, frame):
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.requested = signal.Signals(signum).name

  def agreed(self) -> str | None:
    """The signal's name once any process got one; the same answer on every process at the same step."""
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils
    flags = np.asarray(multihost_utils.process_allgather(np.int32(self.requested is not None)))
    if not flags.any():
      return None
    return self.requested or f"a signal to process {int(np.argmax(flags))}"

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      # None: a handler installed outside Python (JAX's preemption notifier), which cannot be put back
      signal.signal(sig, signal.SIG_DFL if handler is None else handler)


def _progress(total: int, initial: int, desc: str, enabled: bool):
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
              disable=not enabled, mininterval=1.0)


def _log_memory(compiled: Any, name: str) -> dict:
  """Log the compiled step's memory and FLOPs: an out-of-memory shows before the first step runs."""
  info = {}
  mem = compiled.memory_analysis()
  if mem is not None:
    for field in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                  "temp_size_in_bytes", "generated_code_size_in_bytes"):
      info[field] = int(getattr(mem, field, 0) or 0)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
  if cost and "flops" in cost:
    info["flops"] = float(cost["flops"])
  mib = lambda b: f"{b / 2**20:.1f} MiB"
  log.info("%s step compiled: arguments %s, outputs %s (aliased %s), temporaries %s, %.3g FLOPs",
           name, mib(info.get("argument_size_in_bytes", 0)), mib(info.get("output_size_in_bytes", 0)),
           mib(info.get("alias_size_in_bytes", 0)), mib(info.get("temp_size_in_bytes", 0)),
           info.get("flops", float("nan")))
  return info


def train(cfg: Any, stage: Stage, workdir: str, data: Data, *, mesh: jax.sharding.Mesh | None = None,
          progress: bool = True, on_step: Callable[[int], None] | None = None) -> Result:
  """Train `stage` in `workdir`, resuming from its latest checkpoint if there is one."""
  hp, tc = stage.hparams, cfg.train
  workdir = paths.run_path(workdir)  # a folder or a URL (gs://...) that every process sees
  if jax.process_index() == 0:  # what `export` and later stages read back
    paths.write_text(workdir / "config.json", cfg.to_json(indent=2))
  if tc.nan_policy not in ("stop", "skip"):
    raise UserError(f"train.nan_policy must be 'stop' or 'skip', got '{tc.nan_policy}'")

  # --- Mesh.
  mesh = mesh or sharding.make_mesh(cfg.mesh.to_dict())
  rules = sharding.logical_rules(cfg.logical_axis_rules)
  global_bs = int(hp.batch_size)
  sharding.check_batch_size(global_bs, mesh)
  if global_bs % jax.process_count():
    raise UserError(f"batch size {global_bs} is not divisible by the {jax.process_count()} processes")
  local_bs = global_bs // jax.process_count()

  # --- Data: this process's part of the global batch; an endless, checkpointable iterator.
  steps_per_epoch = max(data.num_examples("train") // global_bs, 1)
  total_steps = stage.total_steps(steps_per_epoch)
  train_iter = data.iterator("train", batch_size=local_bs, shuffle=True, num_epochs=None,
                             seed=int(cfg.data.shuffle_seed), random_crop=bool(hp.get("random_crop", True)))

  # --- Optimizer and state layout (shapes and shardings, nothing allocated yet).
  schedule = state_lib.make_schedule(hp, steps_per_epoch, total_steps)
  tx = state_lib.make_optimizer(hp, schedule)
  ema_decay = float(hp.get("ema_decay", 0.0) or 0.0)
  rng = jax.random.PRNGKey(int(cfg.seed))
  init_rng, step_rng = jax.random.split(rng)
  shapes, shardings = state_lib.state_layout(stage.init, tx, mesh, rules, init_rng, ema_decay > 0)
  abstract_state = checkpoint.abstract_tree(shapes, shardings)

  # --- Restore the latest checkpoint, or a sharded init (+ pretrained parts) for a fresh run. Checkpoints
  # hold params, optimizer state, EMA and the data iterator; frozen sub-models are written once, to frozen/.
  ckpt = checkpoint.TrainCheckpointer(workdir / "checkpoints", keep=int(tc.keep_checkpoints))
  meta: dict = {}
  if ckpt.latest_step() is not None:
    state, meta = ckpt.restore(
        abstract_state.replace(frozen=checkpoint.mutable_frozen(abstract_state.frozen)), train_iter)
    state = state.replace(frozen=checkpoint.overlay(checkpoint.load_frozen(workdir, shardings.frozen), state.frozen))
    log.info("%s: resumed from step %d in %s", stage.name, ckpt.latest_step(), ckpt.directory)
  else:
    state = state_lib.init_state(stage.init, tx, mesh, rules, init_rng, shardings)
    if stage.load_pretrained is not None:
      state = stage.load_pretrained(state)
    checkpoint.save_frozen(workdir, state.frozen)
  start_step = int(jax.device_get(state.step))
  writer = MetricWriter(workdir, resume_step=start_step)
  if start_step >= total_steps or meta.get("early_stopped"):
    ckpt.close()
    return Result(step=start_step, status="early_stopped" if meta.get("early_stopped") else "done",
                  metrics={}, best=meta.get("best"))

  # --- The step: jitted with in/out shardings, state donated, compiled ahead of time once.
  first = {k: v for k, v in next(train_iter).items() if k in stage.batch_keys}
  batch_spec = {k: ((global_bs,) + np.shape(v)[1:], np.asarray(v).dtype) for k, v in first.items()}
  signature = state_lib.train_step_with_signature(stage.loss, hp, tc.nan_policy, tx, schedule, shapes, shardings,
                                                  batch_spec, mesh)
  compiled = signature.compile(mesh, rules)
  replicated = sharding.replicated(mesh)
  _log_memory(compiled, stage.name)
  step_rng = jax.device_put(step_rng, replicated)

  # --- The loop.
  log_every, ckpt_every = int(tc.log_every_steps), int(tc.checkpoint_every_steps)
  best = meta.get("best")
  evals_since_best = int(meta.get("evals_since_best", 0))
  patience = int(hp.get("patience_epochs", 0) or 0)
  keep_best = bool(hp.get("keep_best", True))  # write the best evaluation's params to best/ (what loaders prefer)
  pending: list[tuple[int, dict]] = []
  last_metrics: dict = {}
  skipped = int(meta.get("skipped_steps", 0))
  bar = _progress(total_steps, start_step, stage.name, progress and jax.process_index() == 0)
  t_last, steps_last = time.perf_counter(), start_step

  def meta_now():
    return {"best": best, "evals_since_best": evals_since_best, "skipped_steps": skipped,
            "stage": stage.name, "early_stopped": status == "early_stopped"}

  def flush(step: int) -> None:
    """Bring the pending metrics to the host: NaN check, JSONL/TensorBoard row, progress bar."""
    nonlocal pending, last_metrics, skipped, t_last, steps_last
    if not pending:
      return
    rows = jax.device_get([m for _, m in pending])
    steps = [s for s, _ in pending]
    pending = []
    bad = [s for s, r in zip(steps, rows) if not r["finite"]]
    if bad and tc.nan_policy == "stop":
      raise TrainingDiverged(
          f"{stage.name}: the loss or gradients became NaN/Inf at step {bad[0]}; stopped without saving it. "
          f"The last good checkpoint is step {ckpt.latest_step()} in {ckpt.directory}. Lower the learning "
          f"rate, set a grad_clip, or pass --set train.nan_policy=skip to skip such batches.")
    skipped += len(bad)
    good = [r for r in rows if r["finite"]] or rows
    now = time.perf_counter()
    metrics = {k: float(np.mean([r[k] for r in good])) for k in rows[-1] if k != "finite"}
    metrics["steps_per_s"] = (step - steps_last) / max(now - t_last, 1e-9)
    if skipped:
      metrics["skipped_steps"] = skipped
    if getattr(train_iter, "bad_records", 0):  # --skip-bad-records: records replaced so far
      metrics["bad_records"] = int(train_iter.bad_records)
    t_last, steps_last = now, step
    writer.write(step, metrics)
    last_metrics = metrics
    bar.set_postfix(loss=f"{metrics['loss']:.4f}", steps_per_s=f"{metrics['steps_per_s']:.2f}",
                    refresh=False)
    if bad:
      log.warning("%s: skipped non-finite steps %s (total %d)", stage.name, bad, skipped)

  status = "done"
  batch = first
  try:
    with PreemptionGuard() as guard:
      for step in range(start_step, total_steps):
        if batch is None:
          batch = {k: v for k, v in next(train_iter).items() if k in stage.batch_keys}
        state, metrics = compiled(state, sharding.global_batch(batch, mesh), step_rng)
        batch = None
        done = step + 1
        pending.append((done, metrics))
        bar.update(1)
        if on_step is not None:
          on_step(done)
        preempted = guard.agreed()
        epoch_end = stage.evaluate is not None and done % steps_per_epoch == 0
        save = done % ckpt_every == 0 or done == total_steps
        if done % log_every == 0 or preempted or epoch_end or save:
          flush(done)
        if epoch_end:
          result = stage.evaluate(state, data, mesh)
          writer.write(done, {**result, "epoch": done // steps_per_epoch}, split="val")
          if best is None or result["score"] > best["score"]:
            best, evals_since_best = {**result, "step": done}, 0
            if keep_best:
              mutable = checkpoint.mutable_frozen(state.frozen)
              best_tree = {"params": state.params, **({"frozen": mutable} if mutable else {})}
              checkpoint.save_params(workdir / "best", best_tree, cfg, kind=stage.name)
          else:
            evals_since_best += 1
          bar.write(f"{stage.name} epoch {done // steps_per_epoch}: "
                    + ", ".join(f"{k} {v:.4f}" for k, v in result.items()) + f" (best {best['score']:.4f})")
          if patience and evals_since_best >= patience:
            status = "early_stopped"
        if preempted:
          status = "preempted"
          bar.write(f"{stage.name}: {preempted}: saving step {done} and exiting")
        if save or status != "done":
          ckpt.save(done, state.replace(frozen=checkpoint.mutable_frozen(state.frozen)), train_iter, meta_now(),
                    force=True)
        if status != "done":
          break
  except jax.errors.JaxRuntimeError as e:
    distributed.await_lost_process(e)  # a dead peer: JAX names it and ends this process
    raise
  finally:
    bar.close()
    writer.close()
    ckpt.close()
  end_step = int(jax.device_get(state.step))
  return Result(step=end_step, status=status, metrics=last_metrics, best=best)
