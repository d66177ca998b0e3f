"""Process-level facts every layer may ask for: the rank, the config folder, logging, user errors.

- :func:`is_rank0`: whether this process is global rank 0 (before the process group exists
  too: torchrun's ``RANK`` or Slurm's ``SLURM_PROCID``). The one place that answers it.
- :func:`config_dir` / :func:`config_search_path`: where the Hydra configs live
  (``$ALIGNER_CONF_DIR``, else the repository's ``conf/`` in a source checkout, else the
  installed package data ``aligner.conf``). The one place that answers it.
- :func:`setup_logging`: the ``aligner`` logger with a rank-aware format; ranks other than 0
  only report errors. Messages go through ``tqdm.write`` so progress bars stay intact.
- :class:`UserError`: a mistake in what the user gave (config, path, data, layout); the
  command line prints it as one ``aligner <cmd>: error: ...`` line and exits 2.
- :func:`lazy_exports`: a package's public names loaded on first use (PEP 562), so that
  importing a light submodule (a config schema) does not import the heavy ones.
- :class:`RunStopped`: a command stopped by a signal, with where it can resume from.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Dict, Optional

CONFIG_PACKAGE = "aligner.conf"  # the package-data module setup.py maps the repository's conf/ to


class UserError(ValueError):
    """An error in what the user asked for; ``hint`` says how to fix it (printed on its own line)."""

    def __init__(self, message: str, hint: Optional[str] = None):
        super().__init__(message)
        self.hint = hint


class RunStopped(BaseException):
    """A command stopped by a signal (Ctrl-C's SIGINT, SIGTERM: what Slurm sends before a
    time limit); ``message`` says what was kept and where the run can resume from. The
    command line prints it as one ``aligner <cmd>: <message>`` line and exits with
    128 + ``signum``, as a shell reports a process ended by that signal. A BaseException,
    like KeyboardInterrupt, so that handlers of errors let it through."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def raise_on_sigterm(signum, frame) -> None:
    """A SIGTERM handler: stop the command where it is, as Ctrl-C does (:class:`RunStopped`);
    the training loop replaces it while it trains, to save a checkpoint first."""
    raise RunStopped("stopped by SIGTERM", signum)


# ------------------------------------------------------------------------------ ranks
def global_rank() -> int:
    """This process's global rank: the process group's, else the launcher's variables, else 0."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:  # the rank is asked before torch is importable only in tooling
        pass
    for key in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(key, "")
        if value.isdigit():
            return int(value)
    return 0


def is_rank0() -> bool:
    """True on global rank 0 (and in a single process); the process that prints and writes."""
    return global_rank() == 0


# ------------------------------------------------------------------------------ configs
def config_dir() -> Path:
    """The folder holding the Hydra configs (``sft.yaml``, ``model/``, ...).

    ``$ALIGNER_CONF_DIR`` if set; else the repository's top-level ``conf/`` when aligner runs
    from a source checkout (an editable install reads the files you edit); else the installed
    package data ``aligner/conf`` (a wheel or a non-editable install).
    """
    env = os.environ.get("ALIGNER_CONF_DIR")
    if env:
        path = Path(env)
        if not path.is_dir():
            raise UserError(f"ALIGNER_CONF_DIR = {env!r} is not a folder")
        return path
    package = Path(__file__).resolve().parent
    checkout = package.parent / "conf"
    if (package.parent / "setup.py").is_file() and checkout.is_dir():
        return checkout
    installed = package / "conf"
    if installed.is_dir():
        return installed
    raise UserError(
        f"no config folder: neither {checkout} (a source checkout) nor {installed} (installed package data)"
        " exists", hint="reinstall aligner, or set ALIGNER_CONF_DIR to a folder of configs")


def config_search_path() -> str:
    """Hydra's search-path entry for :func:`config_dir`: ``pkg://aligner.conf`` for installed
    package data, ``file://<dir>`` for a checkout or ``$ALIGNER_CONF_DIR``."""
    path = config_dir()
    if path == Path(__file__).resolve().parent / "conf":
        return f"pkg://{CONFIG_PACKAGE}"
    return f"file://{path.resolve()}"


# ------------------------------------------------------------------------------ logging
class _TqdmHandler(logging.StreamHandler):
    """Writes records with ``tqdm.write`` so an active progress bar is redrawn below them."""

    def emit(self, record):
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging must never raise into the program
            self.handleError(record)


class _RankFilter(logging.Filter):
    """Adds ``record.rank``; drops records below ERROR on ranks other than 0 (asked per
    record: the process group may start after logging is set up)."""

    def filter(self, record):
        record.rank = global_rank()
        return record.rank == 0 or record.levelno >= logging.ERROR


def setup_logging(level: int = logging.INFO) -> logging.Logger:
    """Configure the ``aligner`` logger once: ``[aligner rank R] message`` on stderr.

    Rank 0 logs at ``level``; other ranks log errors only, so a multi-process job prints
    each message once. Idempotent (a later call only changes the level).
    """
    import sys

    logger = logging.getLogger("aligner")
    if not any(isinstance(h, _TqdmHandler) for h in logger.handlers):
        handler = _TqdmHandler(sys.stderr)
        handler.addFilter(_RankFilter())
        handler.setFormatter(logging.Formatter("[aligner rank %(rank)s] %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level)
    return logger


def get_logger(name: str) -> logging.Logger:
    """A child of the ``aligner`` logger (configured by :func:`setup_logging` on first use)."""
    if not logging.getLogger("aligner").handlers:
        setup_logging()
    return logging.getLogger(name if name.startswith("aligner") else f"aligner.{name}")


# ------------------------------------------------------------------------------ packages
def lazy_exports(package: str, exports: Dict[str, str]) -> Callable[[str], object]:
    """The module ``__getattr__`` (PEP 562) of ``package``: ``exports`` maps a public name to
    the submodule defining it, imported when the name is first asked for."""

    def __getattr__(name: str):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__


__all__ = ["RunStopped", "UserError", "lazy_exports", "config_dir", "config_search_path", "get_logger", "global_rank", "is_rank0",
           "raise_on_sigterm", "setup_logging"]
