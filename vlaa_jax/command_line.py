"""The main job's command line, checked before absl parses it: a mistake is one line naming the thing
and its fix (`CommandLineError`; vlaa_jax.main prints it and exits with code 2), never a traceback.

`--config FILE.py:PRESET` is user input: FILE is looked for as given, then in the project directory
(so `configs/grpo.py:demo` works from any directory); the preset must be one of the file's PRESETS; every
`--config.key=value` override must name a key of that preset. `--help` lists the modes, the presets of
each config file and how to override keys.
"""
from __future__ import annotations

import difflib
import glob
import importlib.util
import os
import sys
from typing import Any, Callable, NoReturn, Sequence

import ml_collections
from absl import flags

from vlaa_jax.train.config_check import MODES

# The project directory (the repository root with `pip install -e .`): configs/ lives there.
PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FLAG = "--config"
EXAMPLE = "--config configs/grpo.py:demo"
MODE_HELP = {
    "sft": "supervised fine-tuning (configs/sft.py)",
    "grpo": "GRPO with the mixed reward (configs/grpo.py)",
    "eval": "benchmark a model with the paper's settings: --config.mode=eval --config.model.init=pretrained "
            "--config.model.path=DIR [--config.eval.data=FILE]",
    "generate": "print sampled responses of a model to a few prompts (--config.mode=generate)",
}


class CommandLineError(ValueError):
    """A mistake on the command line; the message names it and the fix."""


def _suggest(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}? " if close else ""


def config_files() -> list[str]:
    """The project's config files, as `configs/<name>.py` (relative to the project directory)."""
    paths = sorted(glob.glob(os.path.join(PROJECT_DIR, "configs", "*.py")))
    return [os.path.relpath(p, PROJECT_DIR) for p in paths if not os.path.basename(p).startswith("_")
            and os.path.basename(p) != "base.py"]


def resolve_config_file(path: str) -> str:
    """`path` as given when it exists, else the same relative path under the project directory."""
    if os.path.isfile(path):
        return path
    if not os.path.isabs(path) and os.path.isfile(os.path.join(PROJECT_DIR, path)):
        return os.path.join(PROJECT_DIR, path)
    files = config_files()
    hint = "" if os.path.isabs(path) else _suggest(path, files)
    raise CommandLineError(f"config file {path!r} not found; {hint}the config files are "
                           f"{', '.join(files)} (e.g. {EXAMPLE})")


def _load_module(path: str) -> Any:
    spec = importlib.util.spec_from_file_location("preset_config", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - the user's config file: say which and why, in one line
        raise CommandLineError(f"config file {path!r} does not load: {type(e).__name__}: {e}") from e
    if not callable(getattr(module, "get_config", None)):
        raise CommandLineError(f"config file {path!r} has no get_config(preset) function")
    return module


def presets(path: str) -> tuple[str, ...]:
    """The PRESETS a config file declares (empty when it declares none)."""
    return tuple(getattr(_load_module(path), "PRESETS", ()))


def load_preset(spec: str, shown: str | None = None) -> ml_collections.ConfigDict:
    """The config `--config spec` ("path/to/file.py[:preset]") names, without overrides, loaded by path and
    called as config_flags does (`get_config(preset)`); errors name the file as `shown` (default: as given)."""
    path, *arg = spec.split(":", 1)
    module = _load_module(resolve_config_file(path))
    path = shown or path
    known = tuple(getattr(module, "PRESETS", ()))
    if arg and known and arg[0] not in known:
        raise CommandLineError(f"unknown preset {arg[0]!r} of {path}; {_suggest(arg[0], known)}choose one of "
                               f"{', '.join(known)} (e.g. --config {path}:{known[0]})")
    try:
        return module.get_config(*arg)
    except (ValueError, KeyError) as e:
        raise CommandLineError(f"--config {spec}: {e}") from e


def _config_spec(argv: Sequence[str]) -> tuple[int, str] | None:
    """(index of the argument holding it, the value) of --config in argv, or None."""
    for i, a in enumerate(argv):
        if a == CONFIG_FLAG and i + 1 < len(argv):
            return i + 1, argv[i + 1]
        if a.startswith(CONFIG_FLAG + "="):
            return i, a[len(CONFIG_FLAG) + 1:]
    return None


def check_overrides(argv: Sequence[str], reference: ml_collections.ConfigDict) -> None:
    """Every `--config.key[=value]` of argv names a key of `reference` (the preset)."""
    for a in argv:
        if not a.startswith(CONFIG_FLAG + "."):
            continue
        key = a[len(CONFIG_FLAG) + 1:].split("=", 1)[0]
        node: Any = reference
        parts = key.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                where = ".".join(parts[:i])
                choices = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                close = difflib.get_close_matches(part, choices, n=1, cutoff=0.6)
                fix = f"did you mean {'.'.join(parts[:i] + close[:1])!r}? " if close else ""
                raise CommandLineError(
                    f"config key {key!r} is unknown; {fix}override a key of the preset as "
                    f"--config.KEY=VALUE ({'keys of ' + repr(where) if where else 'top-level keys'}: "
                    f"{', '.join(choices)})")
            node = node[part]


def checked_argv(argv: list[str]) -> tuple[list[str], ml_collections.ConfigDict | None]:
    """argv with the config file resolved (see `resolve_config_file`) and the preset loaded and its
    overrides checked; (argv, the preset un-overridden) or (argv, None) without --config."""
    found = _config_spec(argv)
    if found is None:
        return argv, None
    i, spec = found
    path, sep, preset = spec.partition(":")
    resolved = resolve_config_file(path)
    reference = load_preset(resolved + sep + preset, shown=path)
    argv = list(argv)
    argv[i] = (CONFIG_FLAG + "=" if argv[i].startswith(CONFIG_FLAG + "=") else "") + resolved + sep + preset
    check_overrides(argv, reference)
    return argv, reference


def illegal_value_message(message: str, reference: ml_collections.ConfigDict | None) -> str:
    """absl's "flag --config.a.b=v: <why>" as one line naming the key, its type and the fix."""
    head, _, why = message.partition(": ")
    if head.startswith("flag " + CONFIG_FLAG + ".") and "=" in head:
        key, _, value = head[len("flag " + CONFIG_FLAG + "."):].partition("=")
        want = ""
        if reference is not None:
            node: Any = reference
            for part in key.split("."):
                node = node[part] if isinstance(node, ml_collections.ConfigDict) and part in node else None
            if node is not None:
                kind = type(node).__name__
                want = f" takes {'an' if kind[0] in 'aeiou' else 'a'} {kind} (the preset has {node!r})"
        return f"config key {key!r}{want}, got {value!r}: {why.strip()}; fix --config.{key}=VALUE"
    return message.replace("\n", " ")


def help_text() -> str:
    """`--help`: usage, the modes, the presets of each config file and how to override keys."""
    lines = ["usage: python -m vlaa_jax.main --config FILE.py:PRESET --workdir DIR [--config.KEY=VALUE ...]",
             "", "modes (--config.mode=MODE; the config file sets its own):"]
    lines += [f"  {m:<10}{MODE_HELP.get(m, '')}" for m in MODES]
    lines += ["", "config files and their presets (FILE.py:PRESET; paths are relative to the working directory "
              f"or to {PROJECT_DIR}):"]
    for f in config_files():
        try:
            names = ", ".join(presets(os.path.join(PROJECT_DIR, f))) or "(no PRESETS declared)"
        except CommandLineError as e:
            names = str(e)
        lines.append(f"  {f}: {names}")
    lines += ["", "override any key of the preset: --config.KEY=VALUE, e.g. --config.train.num_steps=10 "
              "--config.seed=1 --config.data.dir=DIR --config.sharding.mesh_shape='(1,-1,1)'",
              "  the keys and their meaning: the config files and configs/base.py; an unknown key or a value "
              "of the wrong type stops the run before anything is built",
              "--workdir DIR: checkpoints, metrics, TensorBoard events, the exported model (a rerun resumes)",
              "", f"example: python -m vlaa_jax.main {EXAMPLE} --workdir workdir/grpo_demo"]
    return "\n".join(lines)


def fail(error: object) -> NoReturn:
    """The user's mistake: one `error:` line on stderr, exit code 2."""
    if isinstance(error, KeyError) and error.args:
        error = error.args[0]  # str(KeyError) quotes its message
    print(f"error: {str(error).replace(chr(10), ' ')}", file=sys.stderr)
    sys.exit(2)


def parse_config_flags(argv: list[str], *, usage: Callable[[], str], example: str) -> list[str]:
    """An entry point's absl flag parsing (vlaa_jax.main, python -m data_pipeline.construct) after the
    checks of `checked_argv` (config file, preset, override keys): --help prints `usage()` and exits 0; a
    command-line mistake is `fail` (one `error:` line, exit code 2). Returns what absl's parser returns."""
    if any(a in ("--help", "-h", "--helpshort", "-?") for a in argv[1:]):
        print(usage())
        sys.exit(0)
    reference = None
    try:
        argv, reference = checked_argv(argv)
        if reference is None:
            raise CommandLineError(f"--config is required, e.g. {example} (--help lists the presets)")
        return flags.FLAGS(argv)
    except CommandLineError as e:
        fail(e)
    except flags.IllegalFlagValueError as e:
        fail(illegal_value_message(str(e), reference))
    except Exception as e:  # noqa: BLE001 - any other parse error ends here, as one line
        fail(f"{type(e).__name__}: {e}")
