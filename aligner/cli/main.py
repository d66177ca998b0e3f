"""``aligner``: the command-line entry point (a dispatcher over ``aligner.cli.<module>``).

Each subcommand lives in its own module with ``main(argv) -> int`` and is imported only
when used, so ``aligner --help`` and ``aligner env`` stay fast.
"""
from __future__ import annotations

import importlib
import sys
import warnings
from typing import List, Optional

SUBCOMMANDS = {
    "quickstart": ("quickstart", "the embedded end-to-end recipe: world -> SFT -> reward models -> DPO -> report"),
    "train": ("train", "train with a Hydra config from conf/ (sft, rm_regression, rm_bt, dpo, recipes)"),
    "data": ("data", "synthesise the embedded world; validate, inspect and pack data files"),
    "generate": ("generate", "generate responses for a prompts file (optionally scored by a reward model)"),
    "rm": ("rm", "reward-model utilities: score a file, ExPO extrapolation"),
    "eval": ("eval", "evaluate reward models: RewardBench-format files, HelpSteer2 regression metrics"),
    "export": ("export", "training checkpoint -> Hugging Face folder"),
    "env": ("env", "print the software / hardware stack (paste it into bug reports)"),
}


def _usage() -> str:
    lines = ["usage: aligner <command> [args...]", "", "commands:"]
    lines += [f"  {name:<11} {desc}" for name, (_, desc) in SUBCOMMANDS.items()]
    lines += ["", "aligner <command> --help describes a command; aligner --version prints the version."]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        from aligner import __version__

        print(f"aligner {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"aligner: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    # megatron-core announces at import that TE / Apex are absent; `aligner env` reports that
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex) (and Apex )?(is|are) not installed.*")
    try:
        module = importlib.import_module(f"aligner.cli.{SUBCOMMANDS[name][0]}")
    except ModuleNotFoundError as exc:
        if exc.name == f"aligner.cli.{SUBCOMMANDS[name][0]}":
            print(f"aligner: the {name!r} command is not available in this installation", file=sys.stderr)
            return 2
        raise
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
