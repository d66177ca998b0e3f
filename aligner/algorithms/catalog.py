"""Every algorithm of the toolkit, found and imported once so that each registers its
trainer (:data:`aligner.algorithms.base.TRAINERS`).

An algorithm module is any module or package of :mod:`aligner.algorithms` that is not part
of the shared core (:data:`SHARED_CORE`, the one list of those names) and whose name does
not start with ``_``: a module dropped into the package is an algorithm ``aligner train``
runs, with no line to add anywhere (docs/architecture.md). The layering test builds the
independence contract of the algorithm modules from :func:`algorithm_modules` too.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import List

import aligner.algorithms as package
from aligner.algorithms.base import TRAINERS

SHARED_CORE = ("base", "catalog", "composition", "iterative", "losses", "online")


def algorithm_modules() -> List[str]:
    """The algorithm modules' full names, sorted: the package's modules and subpackages on
    disk, less the shared core and private names (found without importing them)."""
    return sorted(f"{package.__name__}.{found.name}" for found in pkgutil.iter_modules(package.__path__)
                  if found.name not in SHARED_CORE and not found.name.startswith("_"))


for _module in algorithm_modules():
    importlib.import_module(_module)  # registers its trainer

__all__ = ["SHARED_CORE", "TRAINERS", "algorithm_modules"]
