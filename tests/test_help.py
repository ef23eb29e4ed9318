"""Every command's ``--help``: exit status 0, each option listed with its description, and
every option the README shows for that command among them.

The console scripts are read from pyproject.toml's ``[project.scripts]``, so a new script is
covered without editing this file; the ``python -m`` commands that have no script are listed
below. Each command runs in a subprocess, as a user would type it.
"""

import functools
import os
import re
import subprocess
import sys
import tomllib

import pytest

# A subprocess per command and subcommand: `make test-fast` leaves these out.
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Commands without a console script, which README.md shows as ``python -m MODULE``.
MODULE_COMMANDS = ("fastdp_jax.export", "fastdp_jax.dp.privacy_eval", "fastdp_jax.checkpoint",
                   "preprocessing.poisson_batches", "preprocessing.mapreduce.local",
                   "preprocessing.mapreduce.to_shards")
# What the trainer's help must name (issue 25, item 9): the config, the workdir, the
# multi-host flags, and how to list the config keys.
TRAINER_OPTIONS = ("--config", "--workdir", "--coordinator_address", "--num_processes",
                   "--process_id", "--config_keys", "--config.KEY=VALUE")


def _scripts() -> dict[str, str]:
  """Console script name -> the module ``python -m`` runs."""
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    scripts = tomllib.load(f)["project"]["scripts"]
  modules = {}
  for name, target in scripts.items():
    module = target.split(":")[0]
    modules[name] = module.removesuffix(".__main__")  # python -m fastdp_jax runs __main__
  return modules


COMMANDS = {**_scripts(), **{m: m for m in MODULE_COMMANDS}}


def _help(module: str, *sub: str) -> str:
  r = subprocess.run([sys.executable, "-m", module, *sub, "--help"], cwd=ROOT,
                     capture_output=True, text=True, timeout=120, check=False,
                     env=dict(os.environ, COLUMNS="100"))
  assert r.returncode == 0, (module, sub, r.returncode, r.stderr[-2000:])
  assert "Traceback" not in r.stderr, r.stderr[-2000:]
  assert r.stdout.lower().startswith("usage:"), r.stdout[:500]
  return r.stdout


def _entries(text: str) -> dict[str, str]:
  """Each listed argument (its first token, e.g. ``--input``) -> its description.

  An entry starts a line with two spaces; argparse puts the description after two or more
  spaces on the same line, or on the more deeply indented lines that follow.
  """
  entries: dict[str, str] = {}
  current = None
  for line in text.splitlines():
    first = re.match(r"^  (\S.*?)(?:\s{2,}(\S.*))?$", line)
    if first:
      names = [t.rstrip(",") for t in first.group(1).split() if t.startswith("-")]
      current = names[-1] if names else first.group(1).split()[0]
      entries[current] = first.group(2) or ""
    elif current and line.startswith("   ") and line.strip():
      entries[current] = (entries[current] + " " + line.strip()).strip()
    elif not line.strip() or not line.startswith(" "):
      current = None
  return entries


def _usage_options(text: str) -> set[str]:
  usage = text.split("\n\n", 1)[0]
  return set(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", usage))


def _subcommands(text: str) -> list[str]:
  match = re.search(r"\{([\w,-]+)\}", text.split("\n\n", 1)[0])
  return match.group(1).split(",") if match else []


@functools.cache
def _readme_options() -> dict[str, set[str]]:
  """Command (script or module) -> the options README.md shows after its name on a line."""
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    text = re.sub(r"\\\n\s*", " ", f.read())  # a command continued with a backslash
  found: dict[str, set[str]] = {name: set() for name in COMMANDS}
  for line in text.splitlines():
    for name, module in COMMANDS.items():
      for spelling in {name, f"python -m {module}"}:
        for m in re.finditer(rf"(?<![\w.-]){re.escape(spelling)}(?![\w.-])", line):
          rest = re.split(r"`|\s--\s|;|\(|\)", line[m.end():])[0]
          found[name] |= {o.split("=")[0].split(".")[0]
                          for o in re.findall(r"(?<![\w-])--[a-z][\w.=-]*", rest)}
  return found


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_lists_every_option_with_a_description(name):
  module = COMMANDS[name]
  text = _help(module)
  pages = [("", text)] + [(sub, _help(module, sub)) for sub in _subcommands(text)]
  listed: set[str] = set()
  for sub, page in pages:
    entries = _entries(page)
    listed |= set(entries)
    for option in _usage_options(page):
      assert option in entries, f"{name} {sub}: {option} is in the usage but not listed"
    for arg, description in entries.items():
      if arg.startswith("{"):  # argparse's line naming the subcommands; each has its entry
        continue
      assert re.search(r"[a-z]{3}", description), (
          f"{name} {sub}: {arg} has no description:\n{page}")
  missing = _readme_options()[name] - listed - {"--help"}
  assert not missing, f"README.md shows {sorted(missing)} for {name}; its --help does not"


def test_trainer_help_names_the_config_workdir_and_multi_host_flags():
  entries = _entries(_help("fastdp_jax"))
  for option in TRAINER_OPTIONS:
    assert option in entries, option
  assert "--helpfull" in entries  # absl's and JAX's flags are one flag away


def test_config_keys_lists_every_key_of_the_given_config():
  from fastdp_jax import config as config_lib

  def keys(*args):
    r = subprocess.run([sys.executable, "-m", "fastdp_jax", *args, "--config_keys"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    return dict(line.split(" = ", 1) for line in r.stdout.splitlines())

  def leaves(node, prefix=""):
    for key in node.keys():
      if hasattr(node[key], "keys"):
        yield from leaves(node[key], f"{prefix}{key}.")
      else:
        yield prefix + key

  defaults = keys()
  assert sorted(defaults) == sorted(leaves(config_lib.base_config()))
  assert defaults["dp.noise_multiplier"].startswith("None  # sigma")
  given = keys("--config=configs/test.py", "--config.dp.noise_multiplier=2.5")
  assert given["dp.noise_multiplier"].startswith("2.5")
  assert given["num_epochs"].startswith("2")  # configs/test.py's value, not the default
