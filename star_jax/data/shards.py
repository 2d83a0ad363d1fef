"""Parallel, resumable writing of one split of a TFDS dataset: a shard per task, each finished one marked by a sidecar.

A shard's sidecar (`<shard>.json`) is written after its ArrayRecord file and lists its record count, the
items it skipped with their reasons, notes on items kept with a change (e.g. trimmed), and totals. A rerun
skips every shard whose sidecar exists, so an interrupted prep picks up where it stopped and a finished one
is a no-op.
"""

from __future__ import annotations

import collections
import json
import multiprocessing
import os
from typing import Any, Callable, Sequence

from star_jax.data import records as rec

# A builder turns a task's items into (records, skipped, notes); skipped entries are {"id": ..., "reason": ...},
# notes {"id": ..., "note": ...} (kept items the user should know about, e.g. trimmed).
Builder = Callable[[Sequence[Any]], tuple[list[dict[str, Any]], list[dict[str, str]], list[dict[str, str]]]]


def _stats(records: list[dict[str, Any]], speech_rate: int, audio_rate: int) -> dict[str, Any]:
  voices = collections.Counter(r["voice"] for r in records if "voice" in r)
  return dict(records=len(records),
              speech_s=round(sum(len(r["speech"]) for r in records) / speech_rate, 3),
              audio_s=round(sum(len(r["audio"]) for r in records) / audio_rate, 3),
              voices=dict(sorted(voices.items())))


def _run_shard(job: tuple) -> dict[str, Any]:
  out_dir, name, split, index, count, items, builder, speech_rate, audio_rate, text_dim = job
  path = os.path.join(out_dir, rec.shard_name(name, split, index, count))
  if _INIT_ERROR:
    raise _INIT_ERROR[0]
  records, skipped, notes = builder(items)
  rec.write_shard(path, [rec.encode_record(r, dim=text_dim) for r in records])
  done = dict(shard=os.path.basename(path), items=len(items), skipped=skipped, notes=notes,
              **_stats(records, speech_rate, audio_rate))
  rec.write_json(path + ".json", done)
  return done


_INIT_ERROR: list[Exception] = []  # set when `init` failed in this worker; its first task raises it


def _worker_init(init: Callable[..., None] | None, init_args: tuple, in_pool: bool = False) -> None:
  # Torch and BLAS would each start a thread per core in every worker; one per worker is faster here.
  try:
    import torch
    torch.set_num_threads(1)
  except ImportError:
    pass
  if init is None:
    return
  try:
    init(*init_args)
  except Exception as e:  # noqa: BLE001
    if not in_pool:
      raise
    # A pool whose initializer raises restarts the worker forever; a task passes the error to the caller.
    _INIT_ERROR[:] = [e]


def write_split(out_dir: str, name: str, split: str, tasks: Sequence[Sequence[Any]], builder: Builder, *,
                speech_rate: int, audio_rate: int, text_dim: int, workers: int = 1,
                init: Callable[..., None] | None = None, init_args: tuple = (),
                progress: bool = True) -> dict[str, Any]:
  """Writes one shard per task of dataset `name` into its version directory `out_dir` (skipping finished ones);
  returns the merged sidecars.

  `builder` and `init` must be module-level functions (they are sent to spawned workers); `init(*init_args)`
  runs once per worker before any task (e.g. to load a TTS model).
  """
  from tqdm import tqdm

  os.makedirs(out_dir, exist_ok=True)
  count = len(tasks)
  done, todo = [], []
  for i, items in enumerate(tasks):
    sidecar = os.path.join(out_dir, rec.shard_name(name, split, i, count) + ".json")
    if os.path.exists(sidecar):
      with open(sidecar) as f:
        done.append(json.load(f))
    else:
      todo.append((out_dir, name, split, i, count, list(items), builder, speech_rate, audio_rate, text_dim))
  bar = tqdm(total=sum(len(t[5]) for t in todo), desc=f"{split}: {len(done)}/{count} shards done",
             unit="item", disable=not progress or not todo)
  if workers <= 1 or len(todo) <= 1:
    if todo:
      _worker_init(init, init_args)
    for job in todo:
      done.append(_run_shard(job))
      bar.update(len(job[5]))
  else:
    # spawn, not fork: a forked torch or jax runtime is unsafe.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(min(workers, len(todo)), initializer=_worker_init,
                  initargs=(init, init_args, True)) as pool:
      for result in pool.imap_unordered(_run_shard, todo):
        done.append(result)
        bar.update(result["items"])
  bar.close()
  done.sort(key=lambda d: d["shard"])
  voices = collections.Counter()
  for d in done:
    voices.update(d["voices"])
  return dict(split=split, shards=count, shards_written_now=len(todo),
              items=sum(d["items"] for d in done), records=sum(d["records"] for d in done),
              speech_s=round(sum(d["speech_s"] for d in done), 1),
              audio_s=round(sum(d["audio_s"] for d in done), 1),
              voices=dict(sorted(voices.items())),
              skipped=[s for d in done for s in d["skipped"]],
              notes=[n for d in done for n in d.get("notes", [])])


def chunk(items: Sequence[Any], size: int) -> list[list[Any]]:
  """Splits `items` into consecutive tasks of `size` (the last may be shorter)."""
  return [list(items[i:i + size]) for i in range(0, len(items), size)]
