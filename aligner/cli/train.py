"""``aligner train CONFIG [key=value ...]``: run a trainer from a Hydra config in ``conf/``.

CONFIG is a top-level config (``sft``, ``rm_regression``, ``rm_bt``, ``dpo`` or a recipe
such as ``helpsteer2_rm_regression``); ``key=value`` are Hydra overrides
(``parallel.tp=2``, ``model=llama3_8b``, ``trainer.max_steps=500``, ``+rm.foo=1`` is an
error: the schemas reject unknown keys). ``--cfg job`` prints the composed, validated
config and exits. Multi-process: ``torchrun --nproc-per-node N -m aligner.cli.main train ...``.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional


def conf_dir() -> Path:
    """``$ALIGNER_CONF_DIR`` or the repository's ``conf/``."""
    env = os.environ.get("ALIGNER_CONF_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "conf"
    if not path.is_dir():
        raise FileNotFoundError(f"config directory {path} not found (set ALIGNER_CONF_DIR)")
    return path


def top_configs() -> List[str]:
    return sorted(p.stem for p in conf_dir().glob("*.yaml"))


def compose(name: str, overrides: List[str]):
    """Compose ``conf/<name>.yaml`` with overrides and validate it against its trainer's schema."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from aligner.algorithms.trainers import TRAINERS
    from aligner.training.config import ConfigError, validate_config

    if name not in top_configs():
        raise ConfigError(f"no top-level config {name!r} in {conf_dir()}; available: {top_configs()}")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        cfg = hydra_compose(config_name=name, overrides=list(overrides))
    algorithm = OmegaConf.select(cfg, "algorithm")
    if algorithm not in TRAINERS:
        raise ConfigError(f"conf/{name}.yaml: key 'algorithm' = {algorithm!r}; expected one of {sorted(TRAINERS)}")
    return TRAINERS[algorithm], validate_config(cfg, TRAINERS[algorithm].schema)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="aligner train",
        description="Train with a Hydra config from conf/ (key=value overrides).",
    )
    parser.add_argument("config", nargs="?", help="top-level config name (see --list)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. parallel.tp=2 trainer.max_steps=50")
    parser.add_argument("--cfg", choices=["job"], help="print the composed config and exit")
    parser.add_argument("--list", action="store_true", help="list the top-level configs")
    args = parser.parse_intermixed_args(argv)
    if args.list or not args.config:
        print("configs:", " ".join(top_configs()))
        return 0 if args.list else 2

    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    from aligner.training.config import ConfigError

    try:
        trainer_cls, cfg = compose(args.config, args.overrides)
    except (ConfigError, HydraException) as exc:
        print(f"aligner train: {exc}", file=sys.stderr)
        return 2
    if args.cfg == "job":
        print(OmegaConf.to_yaml(cfg), end="")
        return 0
    from aligner.parallel import LayoutError

    try:
        trainer_cls(cfg).fit()
    except LayoutError as exc:  # a layout this install cannot run: refused before any process group
        print(f"aligner train: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
