"""One worker thread that owns the model: it takes requests from a bounded queue and runs them in batches.

Requests arriving within `window_s` of each other (or waiting while a batch runs) are taken together, up to
`max_batch`. A batch is split into groups of equal (seconds, steps, cfg): those fix the compiled shapes and
the guidance scale of one `Generator` call, while the seed is per row (`Generator.latents` takes one per row),
so a request's noise does not depend on the batch it joined. Each group runs padded to a compiled batch size
(1 or `max_batch`), its speech padded and masked by `Generator.tokens` as `generate` does. A group that fails is
retried row by row, so one bad row fails only its own request.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import math
import queue
import threading
import time
from collections.abc import Callable

import numpy as np

from star_jax.constants import SPEECH_RATE_HZ

log = logging.getLogger("star_jax.serve")


class QueueFull(Exception):
  """The queue holds `max_queue` requests; the caller should answer 503 with `retry_after_s`."""

  def __init__(self, retry_after_s: int):
    super().__init__(f"the queue is full; retry in {retry_after_s} s")
    self.retry_after_s = retry_after_s


class NotReady(Exception):
  """The model is still loading or compiling (or failed to)."""


@dataclasses.dataclass(frozen=True)
class Options:
  seconds: float
  steps: int
  cfg: float
  seed: int

  def group(self) -> tuple[float, int, float]:
    return self.seconds, self.steps, self.cfg


@dataclasses.dataclass
class Result:
  wav: np.ndarray  # (T,) float32 at rate_hz
  rate_hz: int
  timings_ms: dict[str, float]  # encode / generate / decode of the call this row ran in, and its queue wait
  batch_size: int  # requests in that call


@dataclasses.dataclass
class _Job:
  speech: np.ndarray
  options: Options
  future: concurrent.futures.Future
  enqueued: float


class Batcher:
  """`submit(speech, options)` -> a Future of `Result`; `stats()` for /api/health."""

  def __init__(self, load: Callable[[], object], *, max_batch: int = 8, max_queue: int = 64,
               window_s: float = 0.05):
    self._load = load
    self.max_batch, self.max_queue, self.window_s = int(max_batch), int(max_queue), float(window_s)
    self._queue: queue.Queue[_Job] = queue.Queue(self.max_queue)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._main, name="star-jax-serve", daemon=True)
    self.gen = None
    self.state = "loading"
    self.defaults: Options | None = None
    self._sizes: collections.Counter[int] = collections.Counter()
    self._served = self._failed = 0
    self._batch_s = 1.0  # running mean of one call, for Retry-After
    self.warmup_s = None

  def start(self) -> Batcher:
    self._thread.start()
    return self

  def close(self, timeout_s: float = 10.0) -> None:
    self._stop.set()
    self._thread.join(timeout_s)

  @property
  def ready(self) -> bool:
    return self.state == "ready"

  def submit(self, speech: np.ndarray, options: Options) -> concurrent.futures.Future:
    if not self.ready:
      raise NotReady(self.state)
    job = _Job(speech, options, concurrent.futures.Future(), time.perf_counter())
    try:
      self._queue.put_nowait(job)
    except queue.Full:
      raise QueueFull(max(1, math.ceil(self._batch_s * (self.max_queue / self.max_batch + 1)))) from None
    return job.future

  def stats(self) -> dict:
    return {"status": self.state, "model_loaded": self.gen is not None, "ready": self.ready,
            "queue_depth": self._queue.qsize(), "max_queue": self.max_queue, "max_batch": self.max_batch,
            "batching_window_ms": 1000 * self.window_s, "requests_served": self._served,
            "requests_failed": self._failed, "batches": sum(self._sizes.values()),
            "batches_of_2_or_more": sum(n for size, n in self._sizes.items() if size >= 2),
            "batch_sizes": {str(k): v for k, v in sorted(self._sizes.items())},
            "warmup_s": self.warmup_s}

  # The worker thread.

  def _main(self) -> None:
    try:
      t0 = time.perf_counter()
      self.gen = self._load()
      self.state = "warming up"
      self.defaults = self._default_options()
      self._warm_up()
      self.warmup_s = round(time.perf_counter() - t0, 1)
      log.info("serve: model loaded and compiled in %.1f s", self.warmup_s)
      self.state = "ready"
    except Exception as e:  # noqa: BLE001 - reported by /api/health and the page, not a dead thread
      log.exception("serve: loading the model failed")
      self.state = f"failed: {e}"
      return
    while not self._stop.is_set():
      # A request whose client went away was cancelled; the rest can no longer be.
      jobs = [job for job in self._take() if job.future.set_running_or_notify_cancel()]
      groups: dict[tuple, list[_Job]] = {}
      for job in jobs:
        groups.setdefault(job.options.group(), []).append(job)
      for group in groups.values():
        self._run(group)

  def _default_options(self) -> Options:
    f = self.gen.cfg.flow
    return Options(seconds=float(self.gen.cfg.data.audio_duration_s), steps=int(f.num_steps),
                   cfg=float(f.cfg_scale), seed=0)

  def _warm_up(self) -> None:
    """Compile every batch size for the default options and speech as long as the training window (or 1 s)."""
    seconds = max(1.0, float(self.gen.cfg.data.get("speech_duration_s", 0.0)))
    speech = np.random.default_rng(0).uniform(-0.1, 0.1, int(seconds * SPEECH_RATE_HZ)).astype(np.float32)
    for size in self._compiled_sizes():
      self._call([speech] * size, [0] * size, self.defaults)

  def _compiled_sizes(self) -> list[int]:
    # Two shapes, not one per size: each costs a compile of the whole sampler (seconds on a GPU, more on a CPU),
    # and on an accelerator a half-empty batch of max_batch costs about what a full one does.
    return sorted({1, self.max_batch})

  def _take(self) -> list[_Job]:
    """Blocks for the first job, then gathers more until the window closes or max_batch are in hand."""
    while not self._stop.is_set():
      try:
        jobs = [self._queue.get(timeout=0.2)]
        break
      except queue.Empty:
        continue
    else:
      return []
    deadline = time.perf_counter() + self.window_s
    while len(jobs) < self.max_batch:
      try:
        jobs.append(self._queue.get(timeout=max(0.0, deadline - time.perf_counter())))
      except queue.Empty:
        break
    return jobs

  def _call(self, speech: list[np.ndarray], seeds: list[int], o: Options) -> tuple[np.ndarray, dict[str, float]]:
    import jax

    t0 = time.perf_counter()
    tokens = jax.block_until_ready(self.gen.tokens(speech))
    t1 = time.perf_counter()
    latents = jax.block_until_ready(self.gen.latents(tokens, o.seconds, steps=o.steps, cfg_scale=o.cfg, seed=seeds))
    t2 = time.perf_counter()
    wav = self.gen.decode(latents, o.seconds)
    t3 = time.perf_counter()
    return wav, {"encode": 1000 * (t1 - t0), "generate": 1000 * (t2 - t1), "decode": 1000 * (t3 - t2)}

  def _run(self, group: list[_Job]) -> None:
    n = len(group)
    size = next(s for s in self._compiled_sizes() if s >= n)
    pad = size - n  # filler rows repeat the last request; their outputs are dropped
    started = time.perf_counter()
    try:
      wav, timings = self._call([j.speech for j in group] + [group[-1].speech] * pad,
                                [j.options.seed for j in group] + [group[-1].options.seed] * pad, group[0].options)
    except Exception as e:  # noqa: BLE001 - isolate the row that fails; the others still get their sound
      if n > 1:
        log.warning("serve: a batch of %d failed (%s); running its requests one by one", n, e)
        for job in group:
          self._run([job])
        return
      log.exception("serve: generation failed")
      self._failed += 1
      group[0].future.set_exception(e)
      return
    self._batch_s = 0.8 * self._batch_s + 0.2 * (time.perf_counter() - started)
    self._sizes[n] += 1
    for job, row in zip(group, wav[:n]):
      if not np.all(np.isfinite(row)):
        self._failed += 1
        job.future.set_exception(FloatingPointError("the model produced NaN or Inf samples"))
        continue
      self._served += 1
      job.future.set_result(Result(row, self.gen.sample_rate_hz, {**timings, "queue": 1000 * (started - job.enqueued)},
                                   n))
