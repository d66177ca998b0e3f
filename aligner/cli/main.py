"""``aligner``: the command-line entry point (a dispatcher over ``aligner.cli.<module>``).

``aligner <command> [args...]`` imports ``aligner.cli.<module>`` only when that command is
used (so ``aligner --help`` stays instant) and returns its ``main(args) -> int``. Exit
status 2: a usage error, an unknown command, a command whose module (or a package it
needs) is not installed, or a user error (config, path, data, checkpoint, layout): one
``aligner <command>: error: ...`` line (and a ``hint:`` line where one helps), printed by
global rank 0 only, no traceback. ``--debug`` (anywhere before ``--``) or
``ALIGNER_DEBUG=1`` shows the traceback instead. A failing reward source (a reward function
that raises or returns something else than one finite score per response) is reported the
same way, by the rank that met it. Any other exception is an internal error and keeps its
traceback. Ctrl-C and SIGTERM stop a command with one line (for training: the checkpoint
it can resume from, see :mod:`aligner.training.loop`) and exit status 130 / 143.
"""
from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
import threading
import time
import warnings
from typing import List, Optional

from aligner.runtime import RunStopped, UserError, global_rank, is_rank0, raise_on_sigterm, setup_logging

RANK0_REPORT_S = 3.0  # how long other ranks wait before exiting after a user error

# Errors that describe what the user gave (module, class): reported in one line. Looked up
# only in modules already imported, so the check imports nothing.
USER_ERROR_TYPES = (
    ("aligner.data.datasets", "DataFormatError"),
    ("aligner.parallel.state", "LayoutError"),
    ("aligner.models.config", "UnsupportedModelError"),
    ("aligner.models.hf", "CheckpointError"),
    ("aligner.rewards.sources", "RewardError"),
)

# command -> (module under aligner.cli, one-line description)
SUBCOMMANDS = {
    "quickstart": ("quickstart", "the embedded end-to-end recipe: world -> SFT -> reward models -> DPO -> RL"
                                 " -> best-of-n -> report"),
    "train": ("train", "train any algorithm from a Hydra config in conf/ (sft, rm_regression, rm_bt, dpo, kto, ppo,"
                       " pg / rloo / grpo, steerlm2, spin, distill / gkd, recipes: --list)"),
    "data": ("data", "prepare data files once (memory-mapped); synth the embedded world; validate, stats, pack;"
                     " pairs: on-policy preference pairs"),
    "generate": ("generate", "generate responses for a prompts file (optionally scored by a reward model)"),
    "rm": ("rm", "reward-model utilities: score a file, bon (best-of-n), SteerLM label, ExPO extrapolation"),
    "eval": ("eval", "evaluate reward models: RewardBench-format files, HelpSteer2 regression metrics"),
    "export": ("export", "training checkpoint -> Hugging Face folder"),
    "rollouts": ("rollouts", "show the rollouts an online run logged (trainer.log_rollouts): rollouts show RUN --step N"),
    "env": ("env", "print the software / hardware stack (paste it into bug reports)"),
}


def usage() -> str:
    lines = ["usage: aligner <command> [args...]", "", "commands:"]
    lines += [f"  {name:<11} {desc}" for name, (_, desc) in SUBCOMMANDS.items()]
    lines += [
        "",
        "options:",
        "  -h, --help     show this message",
        "  -V, --version  print the aligner version",
        "",
        "aligner <command> --help describes a command.",
    ]
    return "\n".join(lines)


def _load(name: str):
    """The module of command ``name``, or None after printing why it cannot be loaded."""
    module_name = f"aligner.cli.{SUBCOMMANDS[name][0]}"
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            print(f"aligner: the {name!r} command is not available in this installation"
                  f" ({module_name} is missing)", file=sys.stderr)
        elif exc.name and not exc.name.startswith("aligner"):
            print(f"aligner: the {name!r} command needs the Python package {exc.name.split('.')[0]!r},"
                  f" which is not installed (`aligner env` lists the stack)", file=sys.stderr)
        else:
            raise
        return None


def is_user_error(exc: BaseException) -> bool:
    """Whether ``exc`` reports a mistake in the user's input (config, path, data, layout)."""
    if isinstance(exc, (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError)):
        return True
    for module, name in USER_ERROR_TYPES:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(exc, cls):
            return True
    return False


def report_user_error(command: str, exc: BaseException) -> None:
    """``aligner <command>: error: <message>`` (+ ``hint: ...``) on stderr, on global rank 0
    (every rank meets the same mistake in what was given); an error that one rank may meet
    alone (``report_on_any_rank``: a reward source failing on that rank's samples) on the
    rank that met it, named there."""
    if not is_rank0() and not getattr(exc, "report_on_any_rank", False):
        return
    message = " ".join(str(exc).split("\n")[0].split()) or type(exc).__name__
    if not is_rank0():
        message = f"(rank {global_rank()}) {message}"
    if isinstance(exc, (FileNotFoundError, NotADirectoryError, IsADirectoryError)) and exc.filename:
        message = f"{exc.filename}: {exc.strerror or message}"
    print(f"aligner {command}: error: {message}", file=sys.stderr)
    hint = getattr(exc, "hint", None)
    if hint:
        print(f"hint: {hint}", file=sys.stderr)
    sys.stderr.flush()


def _debug_requested(argv: List[str]) -> bool:
    """``--debug`` before any ``--`` (removed from ``argv``), or ``ALIGNER_DEBUG`` set to 1/true/yes."""
    cut = argv.index("--") if "--" in argv else len(argv)
    found = "--debug" in argv[:cut]
    while "--debug" in argv[: argv.index("--") if "--" in argv else len(argv)]:
        argv.remove("--debug")
    return found or os.environ.get("ALIGNER_DEBUG", "").lower() in ("1", "true", "yes")


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_requested(argv)
    setup_logging(logging.DEBUG if debug else logging.INFO)
    if not argv:
        print(usage(), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from aligner import __version__

        print(f"aligner {__version__}")
        return 0
    if argv[0] == "help":  # `aligner help train` = `aligner train --help`
        if len(argv) == 1:
            print(usage())
            return 0
        argv = [argv[1], "--help"]
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"aligner: unknown command {name!r}; expected one of: {', '.join(SUBCOMMANDS)}\n\n{usage()}",
              file=sys.stderr)
        return 2
    # megatron-core announces at import that TE / Apex are absent; `aligner env` reports that
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex) (and Apex )?(is|are) not installed.*")
    module = _load(name)
    if module is None:
        return 2
    previous = _stop_on_sigterm()
    try:
        return int(module.main(rest) or 0)
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (which says where to resume)
        return _report_stop(name, RunStopped("interrupted (Ctrl-C)", signal.SIGINT), debug)
    except RunStopped as exc:
        return _report_stop(name, exc, debug)
    except SystemExit as exc:  # argparse's --help / usage errors inside the command
        code = exc.code
        if code is None or isinstance(code, int):
            return int(code or 0)
        print(code, file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - user errors become one line; the rest re-raise
        if debug or not is_user_error(exc):
            raise
        report_user_error(name, exc)
        if not is_rank0():
            # every rank meets the same mistake; the launcher stops the job when the first rank
            # exits, so the others give rank 0 a moment to print the message
            time.sleep(RANK0_REPORT_S)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _stop_on_sigterm():
    """SIGTERM stops the command as Ctrl-C does (:func:`aligner.runtime.raise_on_sigterm`)
    instead of ending the process silently; returns the previous handler (None where
    handlers cannot be set: not the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, raise_on_sigterm)


def _report_stop(command: str, exc: RunStopped, debug: bool) -> int:
    """``aligner <command>: <what stopped and where to resume>`` on rank 0; 128 + the signal."""
    if debug:
        import traceback

        traceback.print_exc()
    if is_rank0():
        print(f"aligner {command}: {exc}", file=sys.stderr, flush=True)
    return 128 + int(exc.signum)


if __name__ == "__main__":
    sys.exit(main())
