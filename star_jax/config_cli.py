"""Print a resolved config (with `--set key=value` overrides) and the mesh it gives on these devices."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--config", default="configs/star.py:tiny", help="FILE.py:VARIANT (default: %(default)s)")
  p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                 help="override a config value, e.g. --set dit.depth=8 (repeatable)")


def run(args: argparse.Namespace) -> int:
  from star_jax import sharding
  from star_jax.config import load_config
  import jax

  cfg = load_config(args.config, args.overrides)
  print(cfg)
  sizes = sharding.mesh_shape(cfg.mesh.to_dict(), jax.device_count())
  print(f"mesh on {jax.device_count()} {jax.devices()[0].platform} device(s): {sizes}")
  return 0
