"""Loading Python configs (`configs/<name>.py:<arg>`) and applying command-line overrides."""

from __future__ import annotations

import ast
import importlib.util
import pathlib
import sys

import ml_collections

REPO_CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"


def resolve(spec: str) -> tuple[pathlib.Path, str | None]:
    """'toy2d:tiny', 'configs/toy2d.py' or '/abs/path.py:arg' -> (file, arg)."""
    path, _, arg = spec.partition(":")
    candidate = pathlib.Path(path)
    if candidate.suffix != ".py":
        candidate = REPO_CONFIGS / f"{path}.py"
    if not candidate.is_file():
        raise FileNotFoundError(f"config file not found: {candidate} (from {spec!r})")
    return candidate, (arg or None)


def load_config(
    spec: str, overrides: list[str] | tuple[str, ...] = ()
) -> ml_collections.ConfigDict:
    """Import the file's `get_config(arg)`, apply 'a.b=value' overrides, return it locked."""
    path, arg = resolve(spec)
    module_spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    # Configs may import helpers that sit beside them (configs/glide_common.py).
    sys.path.insert(0, str(path.parent))
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as err:
        raise ValueError(
            f"config file {path} does not parse: {err.msg} (line {err.lineno})"
        ) from None
    except ImportError as err:
        raise ValueError(f"config file {path} cannot import what it needs: {err}") from None
    finally:
        sys.path.remove(str(path.parent))
    if not callable(getattr(module, "get_config", None)):
        raise ValueError(f"config file {path} defines no get_config()")
    config = module.get_config(arg) if arg is not None else module.get_config()
    config = ml_collections.ConfigDict(config)
    for item in overrides:
        apply_override(config, item)
    config.lock()
    return config


def apply_override(config: ml_collections.ConfigDict, item: str) -> None:
    """Set 'a.b=value' in place; the value is a Python literal or else a string.

    Unknown keys and values of the wrong type are errors that name the key.
    """
    key, sep, raw = item.partition("=")
    key = key.strip().removeprefix("--").removeprefix("config.")
    if not sep or not key:
        raise ValueError(f"bad override {item!r}: expected key=value")
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
        if name not in node:
            raise KeyError(f"unknown config key {key!r} (no {name!r})")
        node = node[name]
    if leaf not in node:
        raise KeyError(f"unknown config key {key!r}")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    current = node[leaf]
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if current is not None and not isinstance(value, type(current)):
        raise TypeError(f"config key {key!r} expects {type(current).__name__}, got {raw!r}")
    node[leaf] = value
