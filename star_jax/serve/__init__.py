"""A web page to speak into and hear the sound, and its HTTP API, on one loaded bundle.

  star-jax serve --ckpt outputs/demo/bundle [--host 127.0.0.1 --port 8000]
  then open http://127.0.0.1:8000/ (the microphone needs localhost or HTTPS; a dropped file works anywhere)

  curl -F speech=@query.wav -F seconds=5 -F seed=1 http://127.0.0.1:8000/api/generate -o sound.wav
  curl http://127.0.0.1:8000/api/health

The model is loaded and compiled (batch sizes 1 and --max-batch, default options) before the first request is
taken; until then the page says "warming up" and /api/generate answers 503. Needs the `serve` extra. See
docs/serve.md.
"""

from __future__ import annotations

import argparse

from star_jax.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--ckpt", required=True, help="inference bundle written by `star-jax export`")
  p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
  p.add_argument("--port", type=int, default=8000)
  p.add_argument("--max-batch", type=int, default=8, help="requests generated together in one call")
  p.add_argument("--max-queue", type=int, default=64, help="waiting requests beyond this get 503 + Retry-After")
  p.add_argument("--window-ms", type=float, default=50.0, help="how long a lone request waits for company")
  p.add_argument("--max-upload-mb", type=float, default=32.0)
  p.add_argument("--max-speech-seconds", type=float, default=60.0, help="longer speech input is an error")
  p.add_argument("--max-seconds", type=float, default=30.0, help="the longest output a request may ask for")


def build(args: argparse.Namespace):
  """(app, batcher) for these arguments; the batcher loads `args.ckpt` when the app starts."""
  import os

  from star_jax.generate import Generator
  from star_jax.serve.app import Limits, create_app
  from star_jax.serve.batcher import Batcher

  if not os.path.isdir(args.ckpt):
    raise UserError(f"{args.ckpt}: no such bundle directory; write one with `star-jax export` or `star-jax demo`")
  if args.max_batch < 1 or args.max_queue < 1:
    raise UserError(f"--max-batch {args.max_batch} / --max-queue {args.max_queue}: both must be at least 1")
  batcher = Batcher(lambda: Generator(args.ckpt), max_batch=args.max_batch, max_queue=args.max_queue,
                    window_s=args.window_ms / 1000)
  limits = Limits(max_upload_bytes=int(args.max_upload_mb * 2**20), max_speech_seconds=args.max_speech_seconds,
                  max_seconds=args.max_seconds)
  return create_app(batcher, limits), batcher


def run(args: argparse.Namespace) -> int:
  try:
    import uvicorn
  except ImportError:
    raise UserError("serving needs the serve extra: pip install -e '.[serve]'") from None
  app, _ = build(args)
  print(f"star-jax serve: loading {args.ckpt}; open http://{args.host}:{args.port}/ (it says 'warming up' "
        f"until the model is compiled)", flush=True)
  uvicorn.run(app, host=args.host, port=args.port, log_level="info")
  return 0
