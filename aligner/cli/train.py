"""``aligner train CONFIG [key=value ...]``: run a trainer from a Hydra config.

CONFIG is a top-level config (``sft``, ``rm_regression``, ``rm_bt``, ``dpo`` or a recipe
such as ``helpsteer2_rm_regression``; ``--list`` names them), or the name of a trainer
without a YAML file of its own (its schema's defaults); ``key=value`` are Hydra
overrides (``parallel=tp2``, ``model=llama3_8b``, ``trainer.max_steps=500``). Every key
exists in the algorithm's schema, so none needs ``+``; an unknown key, a wrong type or
choice, or a value out of range is an error naming the key before anything starts.

Hydra's conventions: ``--cfg job|hydra|all`` prints the composed config and exits
(``--resolve`` resolves interpolations), ``--info [all|config|defaults|defaults-tree|
searchpath|plugins]`` prints Hydra's view, ``hydra.run.dir=DIR`` names the run folder
(default: ``trainer.out_dir``), ``-m`` / ``--multirun`` runs a sweep
(``dpo.beta=0.05,0.1``) job after job, each in its own run folder
``<hydra.sweep.dir>/<job number>`` (sweep folder default: ``trainer.out_dir``).

Multi-process: ``torchrun --nproc-per-node N -m aligner.cli.main train ...``.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from pathlib import Path
from typing import List, Optional, Tuple

from aligner.algorithms import composition
from aligner.algorithms.composition import composition_error, top_configs, without_hydra
from aligner.config import ConfigError, validate_config
from aligner.runtime import get_logger

INFO_CHOICES = ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")


def trainers() -> dict:
    """Every algorithm's trainer by name (:mod:`aligner.algorithms.catalog`)."""
    # the catalog imports every algorithm module: loaded when a config is composed, so that
    # `aligner train --list` and `--help` answer at once
    from aligner.algorithms.catalog import TRAINERS

    return TRAINERS


def _hydra():
    """A Hydra instance over aligner's config search path, every trainer's schema registered."""
    return composition.hydra_instance({name: cls.schema for name, cls in trainers().items()})


@contextlib.contextmanager
def _root_logging_restored():
    """Hydra's ``--info`` configures the root logger (a stream handler on the stdout of the
    moment, level INFO) to print through it; the handlers and level it leaves are taken back
    on the way out, so a caller in the same process (a script, a notebook) keeps its own
    logging and no handler outlives the stream it writes to."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)
            handler.close()
        for handler in handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(level)


def compose_with_hydra(name: str, overrides: List[str], *, multirun: bool = False, job_num: Optional[int] = None):
    """Compose ``<config dir>/<name>.yaml`` with ``overrides``: the config with its ``hydra`` node."""
    schemas = {n: cls.schema for n, cls in trainers().items()}
    return composition.compose_with_hydra(name, overrides, schemas, multirun=multirun, job_num=job_num)


def _job(cfg, run_dir: str):
    """The job's config (the ``hydra`` node dropped) with its run folder as ``trainer.out_dir``."""
    from omegaconf import open_dict

    job = without_hydra(cfg)
    with open_dict(job):
        job.trainer.out_dir = run_dir
    return job


def _trainer_for(job, name: str):
    registered = trainers()
    algorithm = job.get("algorithm")
    if algorithm not in registered:
        raise ConfigError(f"{name}: algorithm = {algorithm!r}; expected one of {', '.join(sorted(registered))}")
    return registered[algorithm]


def compose(name: str, overrides: List[str]):
    """Compose and validate a single run: ``(trainer class, typed config)``; the run folder
    (``hydra.run.dir``, by default ``trainer.out_dir``) is the config's ``trainer.out_dir``."""
    from omegaconf import OmegaConf

    cfg = compose_with_hydra(name, overrides)
    return _validated(cfg, name, str(OmegaConf.select(cfg, "hydra.run.dir")))


def _validated(cfg, name: str, run_dir: str):
    """``(trainer class, typed config)`` of a composed config whose run folder is ``run_dir``."""
    job = _job(cfg, run_dir)
    trainer_cls = _trainer_for(job, name)
    return trainer_cls, validate_config(trainer_cls.derive(job), trainer_cls.schema)


def sweep_jobs(name: str, overrides: List[str]) -> List[Tuple[List[str], str, object]]:
    """The jobs of a ``-m`` sweep: ``(overrides, run folder, job config)`` each, in Hydra's
    basic sweeper's order (the cartesian product of the swept values)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as exc:
        raise composition_error(exc, name) from None
    batches = BasicSweeper.split_arguments(parsed, None)
    jobs = []
    for num, job_overrides in enumerate(o for batch in batches for o in batch):
        cfg = compose_with_hydra(name, job_overrides, multirun=True, job_num=num)
        sweep = OmegaConf.select(cfg, "hydra.sweep")
        run_dir = str(Path(str(sweep.dir)) / str(sweep.subdir))
        jobs.append((list(job_overrides), run_dir, _job(cfg, run_dir)))
    return jobs


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="aligner train",
        description="Train with a Hydra config (key=value overrides; see --list, --cfg job, -m).",
    )
    parser.add_argument("config", nargs="?", help="top-level config name (see --list)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. parallel.tp=2 trainer.max_steps=50")
    parser.add_argument("--cfg", "-c", choices=["job", "hydra", "all"], help="print the composed config and exit")
    parser.add_argument("--resolve", action="store_true", help="with --cfg: resolve interpolations")
    parser.add_argument("--info", "-i", nargs="?", const="all", choices=INFO_CHOICES,
                        help="print Hydra's information (search path, defaults tree, config) and exit")
    parser.add_argument("--multirun", "-m", action="store_true", help="run a sweep: one job per value combination")
    parser.add_argument("--list", action="store_true", help="list the top-level configs")
    args = parser.parse_intermixed_args(argv)
    if args.list:
        print("configs:", " ".join(top_configs()))
        return 0
    if not args.config:
        raise ConfigError("no config given", hint=f"aligner train CONFIG [key=value ...]; CONFIG one of:"
                                                   f" {', '.join(top_configs())}")
    if args.info:
        cfg = compose_with_hydra(args.config, args.overrides, multirun=args.multirun)
        _validated(cfg, args.config, ".")  # report errors our way
        with _root_logging_restored():
            _hydra().show_info(args.info, args.config, list(args.overrides))
        return 0
    if args.cfg:
        return _print_config(args)
    if args.multirun:
        return _sweep(args.config, args.overrides)
    trainer_cls, cfg = compose(args.config, args.overrides)
    trainer_cls(cfg).fit()
    return 0


def _print_config(args) -> int:
    from omegaconf import OmegaConf

    cfg = compose_with_hydra(args.config, args.overrides, multirun=args.multirun,
                             job_num=0 if args.multirun else None)
    job = without_hydra(cfg)
    trainer_cls = _trainer_for(job, args.config)
    trainer_cls(job)  # the checks a type cannot express (ranges, combinations)
    if args.resolve:  # the whole config, so that hydra's node can refer to the job's keys
        OmegaConf.resolve(cfg)
        job = without_hydra(cfg)
    shown = {"job": job, "hydra": OmegaConf.masked_copy(cfg, ["hydra"]), "all": cfg}[args.cfg]
    print(OmegaConf.to_yaml(shown), end="")
    return 0


def _sweep(name: str, overrides: List[str]) -> int:
    """Every job composed and checked first; then run one after another (Hydra's basic launcher's order)."""
    from omegaconf import OmegaConf

    log = get_logger(__name__)
    jobs = []
    for job_overrides, run_dir, job in sweep_jobs(name, overrides):
        trainer_cls = _trainer_for(job, name)
        trainer = trainer_cls(job)
        trainer.preflight()
        jobs.append((job_overrides, run_dir, trainer))
    previous_layout = None
    for num, (job_overrides, run_dir, trainer) in enumerate(jobs):
        layout = OmegaConf.to_container(trainer.cfg.parallel)
        if previous_layout is not None and layout != previous_layout:
            from aligner.parallel import destroy

            destroy()  # the next job asks for another layout
        previous_layout = layout
        log.info(f"sweep job {num} of {len(jobs)}: {' '.join(job_overrides)} -> {run_dir}")
        trainer.fit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
