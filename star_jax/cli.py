"""The `star-jax` command. Each subcommand lives in its own module with `add_arguments` and `run`.

Modules are imported only when listed or run, and keep heavy imports (jax, torch) inside `run`, so
`star-jax --help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from star_jax.errors import UserError

# name -> (module, one-line help). A command appears only when its module exists.
COMMANDS = {
    "demo": ("star_jax.demo", "train a tiny STAR on the built-in corpus and speak-to-sound end to end"),
    "prepare": ("star_jax.data.prepare_cli", "build TFDS datasets (audiocaps, opensfx) and feature caches (cache)"),
    "train": ("star_jax.train.cli", "train one stage (vae, tta, stage1, stage2, meanflow) from a config"),
    "generate": ("star_jax.generate", "speech wav(s) in, generated audio wav(s) out"),
    "serve": ("star_jax.serve", "a web page and HTTP API: speak, hear the generated sound"),
    "export": ("star_jax.export", "write an inference bundle from training checkpoints"),
    "convert": ("star_jax.convert.cli", "convert PyTorch/HF checkpoints to orbax (hubert, qformer, vae, dit)"),
    "evaluate": ("star_jax.metrics.cli", "score generated audio against references (FAD, FD, KL, IS, CLAP)"),
    "plan": ("star_jax.plan", "compile a train step ahead of time on a simulated mesh; print memory and FLOPs"),
    "config": ("star_jax.config_cli", "print a resolved config (with overrides) and its mesh"),
}


def module_exists(name: str) -> bool:
  """Whether `name` can be imported, without importing it (False when a parent package is missing)."""
  try:
    return importlib.util.find_spec(name) is not None
  except ModuleNotFoundError:
    return False


def available_commands() -> dict[str, tuple[str, str]]:
  return {name: entry for name, entry in COMMANDS.items() if module_exists(entry[0])}


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="star-jax",
      description="STAR speech-to-audio in JAX: say a sound, get the sound. See README.md.")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  for name, (module_name, help_text) in available_commands().items():
    module = importlib.import_module(module_name)
    p = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(p)
    p.set_defaults(_module=module)
  return parser


def main(argv: list[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  if not getattr(args, "command", None):
    parser.print_help()
    return 2
  try:
    return int(args._module.run(args) or 0)
  except (UserError, FileNotFoundError) as e:
    print(f"star-jax {args.command}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
