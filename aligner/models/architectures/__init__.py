"""Architecture adapters, one module per HF model family, found by ``model_type``.

Every module of this package but :mod:`~aligner.models.architectures.base` defines one
family (an :class:`~aligner.models.architectures.base.Architecture`) and registers it with
:func:`register`; they are imported here, so adding a family is adding its module (and its
parity test, tests/models/test_families.py). :func:`get` finds a family by ``model.arch``
(the HF ``model_type``), :func:`for_hf_config` by a HF ``config.json``, and
:func:`model_types` lists them (the choices of the ``model.arch`` config key).

Nothing here imports torch or megatron-core: the config layer lists the families before
any of them is loaded.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Dict, List

from aligner.models.architectures.base import Architecture, UnsupportedModelError

_REGISTRY: Dict[str, Architecture] = {}


def register(adapter: Architecture) -> Architecture:
    """Add a family (keyed by its ``model_type``); returns it."""
    if not adapter.model_type or adapter.model_type in _REGISTRY:
        raise ValueError(f"architecture {adapter.model_type!r}: empty or registered twice")
    _REGISTRY[adapter.model_type] = adapter
    return adapter


def model_types() -> List[str]:
    """The supported HF ``model_type`` values, sorted."""
    return sorted(_REGISTRY)


def get(model_type: str) -> Architecture:
    """The adapter of ``model.arch`` = ``model_type``."""
    if model_type not in _REGISTRY:
        raise UnsupportedModelError(f"model.arch = {model_type!r} is not supported; supported: {model_types()}")
    return _REGISTRY[model_type]


def for_hf_config(hf: dict, source: str) -> Architecture:
    """The adapter of a HF ``config.json`` dict: by ``model_type``, else by a class name in
    ``architectures``; every class named there must be one of the family's."""
    model_type = hf.get("model_type")
    archs = hf.get("architectures") or []
    by_class = {}
    for adapter in _REGISTRY.values():
        by_class[adapter.causal_lm] = adapter
        by_class[adapter.sequence_classification] = adapter
    adapter = _REGISTRY.get(model_type)
    if adapter is None:
        adapter = next((by_class[a] for a in archs if a in by_class), None)
    if adapter is None:
        raise UnsupportedModelError(
            f"{source}: model_type {model_type!r} / architectures {archs} is not supported;"
            f" supported model types: {model_types()}"
        )
    for a in archs:
        if a not in by_class:
            raise UnsupportedModelError(
                f"{source}: architecture {a!r} is not supported; supported: {sorted(by_class)}"
            )
    return adapter


for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _module != "base":
        importlib.import_module(f"{__name__}.{_module}")
