"""Trainers by name: ``TRAINERS[name]`` is the trainer class ``aligner train`` runs for a
config whose ``algorithm`` is ``name``. An algorithm module registers its trainer with
:func:`register_trainer`; :mod:`aligner.algorithms.catalog` imports every algorithm module
once, so that the registry is complete (docs/architecture.md). This module imports no
algorithm.
"""
from __future__ import annotations

from typing import Callable, Dict

TRAINERS: Dict[str, type] = {}


def register_trainer(name: str) -> Callable[[type], type]:
    """Class decorator: ``TRAINERS[name] = cls`` and ``cls.name = name``; the command line
    stores ``cls.schema`` in Hydra's ConfigStore as ``<name>_schema`` (the first default
    of ``conf/<config>.yaml``)."""

    def add(cls: type) -> type:
        if name in TRAINERS:
            raise ValueError(f"a trainer named {name!r} is already registered")
        cls.name = name
        TRAINERS[name] = cls
        return cls

    return add
