"""Lazy package exports (PEP 562): `from unclip_jax.eval import evaluate_shapes` imports
`unclip_jax.eval.faithfulness` on first use, so that importing one light submodule (the CLI's
argument parsers) does not pull in JAX, Flax or tfds through its package's `__init__`."""

from __future__ import annotations

import importlib


def lazy_exports(package: str, exports: dict[str, str]):
    """(__getattr__, __dir__) for a package whose public names live in submodules:
    `exports` maps each name to its submodule (relative to `package`)."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
        globals_ = importlib.import_module(package).__dict__
        globals_[name] = value  # later lookups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted(set(importlib.import_module(package).__dict__) | set(exports))

    return __getattr__, __dir__
