"""`python -m data_prep SOURCE ...`: the same as `star-jax prepare SOURCE ...` (see README "Data")."""

import argparse
import sys

from star_jax.data import prepare_cli
from star_jax.errors import UserError


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m data_prep", description=prepare_cli.__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  prepare_cli.add_arguments(parser)
  args = parser.parse_args(argv)
  try:
    return prepare_cli.run(args)
  except (UserError, FileNotFoundError) as e:
    print(f"data_prep: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":  # spawned prep workers re-import this module; only the parent runs main
  sys.exit(main())
