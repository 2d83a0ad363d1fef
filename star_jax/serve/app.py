"""The HTTP side of `star-jax serve`: the page, `POST /api/generate` and `GET /api/health` (Starlette).

Uploads are checked here, before they reach the queue, with the checks and words of `star-jax generate`
(`read_speech`), so bad input is a 4xx for its own request and never joins a batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import os
import re
import tempfile

from starlette.applications import Starlette
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from star_jax.errors import UserError
from star_jax.serve.batcher import Batcher, NotReady, Options, QueueFull

STATIC = os.path.join(os.path.dirname(__file__), "static")


@dataclasses.dataclass(frozen=True)
class Limits:
  max_upload_bytes: int = 32 << 20
  max_speech_seconds: float = 60.0
  max_seconds: float = 30.0
  max_steps: int = 200
  max_cfg: float = 20.0


class _TooLarge(Exception):
  pass


def _error(status: int, message: str, **headers) -> JSONResponse:
  return JSONResponse({"error": message}, status_code=status, headers={k.replace("_", "-"): v for k, v in headers.items()})


def _number(form, name: str, kind, default, lo, hi, *, lo_open: bool = False, unit: str = ""):
  """A form field as int/float within [lo, hi] ((lo, hi] with `lo_open`), or a UserError naming it."""
  raw = form.get(name)
  if raw is None or str(raw).strip() == "":
    return default
  try:
    value = kind(str(raw).strip())
  except ValueError:
    raise UserError(f"{name} '{raw}': not {'an integer' if kind is int else 'a number'}") from None
  if not math.isfinite(value) or not ((lo < value) if lo_open else (lo <= value)) or value > hi:
    raise UserError(f"{name} {raw}: choose a value {'above' if lo_open else 'from'} {lo:g} up to {hi:g}{unit}")
  return value


def parse_options(form, defaults: Options, limits: Limits) -> Options:
  return Options(seconds=_number(form, "seconds", float, defaults.seconds, 0.0, limits.max_seconds, lo_open=True,
                                 unit=" s"),
                 steps=_number(form, "steps", int, defaults.steps, 1, limits.max_steps),
                 cfg=_number(form, "cfg", float, defaults.cfg, 0.0, limits.max_cfg),
                 seed=_number(form, "seed", int, defaults.seed, 0, 2**31 - 1))


async def _read_form(request: Request, limit: int):
  """The multipart body, refusing more than `limit` bytes whatever Content-Length says."""
  if request.headers.get("content-length", "0").isdigit() and int(request.headers["content-length"]) > limit:
    raise _TooLarge

  async def capped():
    seen = 0
    async for chunk in request.stream():
      seen += len(chunk)
      if seen > limit:
        raise _TooLarge
      yield chunk

  if not request.headers.get("content-type", "").startswith("multipart/form-data"):
    raise UserError("send the speech as multipart/form-data with a `speech` file field")
  return await MultiPartParser(request.headers, capped(), max_files=1, max_fields=16, max_part_size=limit).parse()


def _read_upload(data: bytes, filename: str, max_seconds: float):
  """Uploaded bytes -> 16 kHz mono speech via `read_speech`; its messages name the upload, not the temp file."""
  from star_jax.generate import read_speech

  name = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(filename or "")) or "speech"
  with tempfile.TemporaryDirectory(prefix="star-jax-serve-") as tmp:
    path = os.path.join(tmp, name)
    with open(path, "wb") as f:
      f.write(data)
    try:
      return read_speech(path, max_seconds)
    except UserError as e:
      raise UserError(str(e).replace(path, name)) from None


def _wav_bytes(wav, rate_hz: int) -> bytes:
  from star_jax.generate import write_wav

  with tempfile.TemporaryDirectory(prefix="star-jax-serve-") as tmp:
    path = os.path.join(tmp, "out.wav")
    write_wav(path, wav, rate_hz)
    with open(path, "rb") as f:
      return f.read()


def create_app(batcher: Batcher, limits: Limits = Limits()) -> Starlette:
  """The ASGI app; it starts `batcher` (load, compile, then serve) on startup and stops it on shutdown."""

  async def page(request: Request) -> Response:
    return FileResponse(os.path.join(STATIC, "index.html"))

  async def health(request: Request) -> Response:
    stats = batcher.stats()
    if batcher.defaults is not None:
      stats["defaults"] = dataclasses.asdict(batcher.defaults)
    stats["limits"] = dataclasses.asdict(limits)
    return JSONResponse(stats)

  async def generate(request: Request) -> Response:
    if not batcher.ready:
      return _error(503, f"the model is {batcher.state}; try again shortly", retry_after="5")
    form = None
    try:
      form = await _read_form(request, limits.max_upload_bytes)
      upload = form.get("speech")
      if upload is None or isinstance(upload, str):
        raise UserError("no `speech` file in the form; attach a speech recording")
      data = await upload.read()
      options = parse_options(form, batcher.defaults, limits)
      speech = await asyncio.to_thread(_read_upload, data, upload.filename, limits.max_speech_seconds)
    except _TooLarge:
      return _error(413, f"the upload is larger than {limits.max_upload_bytes / 2**20:g} MiB; send a shorter "
                         f"recording (16 kHz mono wav is plenty)")
    except MultiPartException as e:
      return _error(400, f"malformed form: {e.message}")
    except UserError as e:
      return _error(400, str(e))
    finally:
      if form is not None:
        await form.close()  # the upload's spooled temp file
    try:
      future = batcher.submit(speech, options)
    except QueueFull as e:
      return _error(503, str(e), retry_after=str(e.retry_after_s))
    except NotReady:
      return _error(503, f"the model is {batcher.state}; try again shortly", retry_after="5")
    try:
      result = await asyncio.wrap_future(future)
    except Exception as e:  # noqa: BLE001 - the generation failed for this request only
      return _error(500, f"generation failed: {e}")
    body = await asyncio.to_thread(_wav_bytes, result.wav, result.rate_hz)
    timing = ", ".join(f"{k};dur={v:.1f}" for k, v in result.timings_ms.items())
    return Response(body, media_type="audio/wav", headers={
        "Server-Timing": timing, "X-Batch-Size": str(result.batch_size),
        "X-Seconds": f"{options.seconds:g}", "X-Seed": str(options.seed)})

  @contextlib.asynccontextmanager
  async def lifespan(app):
    batcher.start()
    try:
      yield
    finally:
      await asyncio.to_thread(batcher.close)

  return Starlette(routes=[Route("/", page), Route("/api/health", health),
                           Route("/api/generate", generate, methods=["POST"]),
                           Mount("/static", StaticFiles(directory=STATIC), name="static")], lifespan=lifespan)
