"""The `star-jax` entry point lists its subcommands and each has its own --help."""

import subprocess
import sys

import pytest

from star_jax import cli


def _run(*argv):
  return subprocess.run([sys.executable, "-m", "star_jax.cli", *argv], capture_output=True, text=True,
                        timeout=300)


def test_help_lists_existing_commands():
  out = _run("--help")
  assert out.returncode == 0
  names = cli.available_commands()
  assert "config" in names
  for name in names:
    assert name in out.stdout


@pytest.mark.parametrize("name", sorted(cli.available_commands()))
def test_each_command_has_help(name):
  out = _run(name, "--help")
  assert out.returncode == 0, out.stderr
  assert "usage: star-jax " + name in out.stdout


def test_config_command_and_user_errors():
  out = _run("config", "--config", "configs/star.py:tiny", "--set", "dit.depth=6")
  assert out.returncode == 0, out.stderr
  assert "depth: 6" in out.stdout and "mesh on" in out.stdout
  bad = _run("config", "--set", "dit.nope=1")
  assert bad.returncode == 2
  assert "no key 'dit.nope'" in bad.stderr and "Traceback" not in bad.stderr
