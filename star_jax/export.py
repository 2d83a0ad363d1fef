"""Write an inference bundle: HuBERT, bridge, DiT and VAE params plus the config, as one orbax checkpoint.

  star-jax export --from outputs/tiny/stage2 --out outputs/tiny/bundle
  star-jax generate --ckpt outputs/tiny/bundle --speech query.wav --out sound.wav

`--from` is a stage-2 workdir (it holds every component; its EMA weights are used when it kept them).
`--hubert/--bridge/--dit/--vae` take a component from another workdir or converted checkpoint instead.
"""

from __future__ import annotations

import argparse
import json

from star_jax.errors import UserError

COMPONENTS = ("hubert", "bridge", "dit", "vae")


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--from", dest="source", required=True, help="stage-2 train workdir (a folder or gs:// URL)")
  p.add_argument("--out", required=True, help="bundle directory to write (a folder or gs:// URL)")
  for name in COMPONENTS:
    p.add_argument(f"--{name}", default=None, help=f"take the {name} params from this workdir/checkpoint")


def read_run_config(workdir: str):
  """The config a train run wrote to `workdir/config.json`."""
  import ml_collections

  from star_jax import paths
  path = paths.run_path(workdir) / "config.json"
  if not path.exists():
    raise UserError(f"'{workdir}' has no config.json; is it a `star-jax train` workdir?")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def export_bundle(source: str, out: str, overrides: dict[str, str] | None = None) -> str:
  """Collect the four components from `source` (and `overrides`) into one params checkpoint at `out`."""
  from star_jax import trained
  from star_jax.checkpoint import save_params
  from star_jax.models import build

  cfg = read_run_config(source)
  parts, _ = trained.load_trained(source)
  for name, path in (overrides or {}).items():
    if path:
      parts[name] = trained.component(path, name)
  needed = [n for n in COMPONENTS if n != "vae" or build.vae_trained(cfg)]  # the mel codec has no params
  missing = [n for n in needed if n not in parts]
  if missing:
    raise UserError(f"'{source}' lacks {missing}; export a stage-2 workdir, or pass --{missing[0]} PATH")
  return save_params(out, {n: parts[n] for n in needed}, cfg, kind="bundle")


def load_bundle(directory: str, sharding=None):
  """A bundle written by `export` -> (config, {hubert, bridge, dit, vae} params; no vae for the mel codec)."""
  import ml_collections

  from star_jax.checkpoint import load_params
  params, meta = load_params(directory, sharding)
  if meta.get("kind") != "bundle" or meta.get("config") is None:
    raise UserError(f"'{directory}' is not an inference bundle (kind '{meta.get('kind')}'); write one with "
                    f"`star-jax export --from STAGE2_WORKDIR --out DIR`")
  return ml_collections.ConfigDict(meta["config"]), params


def run(args: argparse.Namespace) -> int:
  out = export_bundle(args.source, args.out, {n: getattr(args, n) for n in COMPONENTS})
  print(f"star-jax export: wrote {out}")
  return 0
