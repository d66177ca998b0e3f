"""Top-level configs composed with Hydra (docs/configuration.md): ``conf/<name>.yaml`` with
its defaults list (the ``<algorithm>_schema`` of a trainer, the config groups, its own
values) and overrides. ``aligner train`` composes every run this way; a trainer built
from Python with a dict starts from the same composition (:meth:`Trainer.defaults
<aligner.algorithms.base.Trainer.defaults>`), so both see the same defaults.
"""
from __future__ import annotations

from typing import List, Mapping, Optional

from aligner.config import ConfigError, describe_omegaconf_error
from aligner.runtime import config_dir, config_search_path


# the ConfigStore group of the top-level configs of trainers without a YAML file of their
# own (a group, so that no name stored here meets a YAML file of another config folder)
GENERATED = "aligner_generated"


def top_configs() -> List[str]:
    """The top-level configs: the YAML files at the top of the config folder."""
    return sorted(p.stem for p in config_dir().glob("*.yaml"))


def config_groups() -> List[str]:
    """The config groups: the folders of YAML files in the config folder (``model``, ``parallel``, ...)."""
    return sorted(p.name for p in config_dir().iterdir() if p.is_dir() and any(p.glob("*.yaml")))


def register_schemas(schemas: Mapping[str, type]) -> None:
    """Hydra's ConfigStore: each trainer's schema as ``<algorithm>_schema`` (the first
    default of ``conf/<config>.yaml``) and ``aligner_run_dirs`` (package ``hydra``, listed in
    every top-level config): the run folder is ``trainer.out_dir``, a ``-m`` sweep puts job
    N in ``<trainer.out_dir>/N``; ``hydra.run.dir`` / ``hydra.sweep.dir`` override them.

    A trainer with no ``conf/<name>.yaml`` gets a top-level config ``<name>`` of its schema's
    defaults alone (every config group listed unselected, so ``parallel=tp2`` still picks
    a group's file): ``aligner train <name>`` runs a new algorithm module as it is."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    files = set(top_configs())
    groups = [{f"/{group}": None} for group in config_groups()]
    for name, schema in schemas.items():
        store.store(name=f"{name}_schema", node=schema)
        if name not in files:  # an algorithm without a YAML file of its own: its schema's defaults
            store.store(group=GENERATED, name=name, package="_global_",
                        node={"defaults": [f"/{name}_schema", "/aligner_run_dirs", *groups, "_self_"]})
    store.store(name="aligner_run_dirs", package="hydra",
                node={"run": {"dir": "${trainer.out_dir}"},
                      "sweep": {"dir": "${trainer.out_dir}", "subdir": "${hydra.job.num}"},
                      "job": {"chdir": False}})


def hydra_instance(schemas: Mapping[str, type]):
    """A Hydra instance over aligner's config search path (``schemas`` registered first)."""
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.global_hydra import GlobalHydra

    register_schemas(schemas)
    GlobalHydra.instance().clear()
    return Hydra.create_main_hydra2(task_name="aligner", config_search_path=create_config_search_path(
        config_search_path()))


def composition_error(exc: BaseException, name: str) -> ConfigError:
    """A Hydra / OmegaConf composition error as one ConfigError line (plus a hint)."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    cause = exc
    while cause is not None and not isinstance(cause, OmegaConfBaseException):
        cause = cause.__cause__ or cause.__context__
    if cause is not None:
        return ConfigError(describe_omegaconf_error(cause))
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if isinstance(exc, MissingConfigException) and lines and lines[0].startswith("Cannot find primary config"):
        return ConfigError(f"no top-level config {name!r}; available: {', '.join(top_configs())}")
    if isinstance(exc, MissingConfigException) and len(lines) > 1 and lines[1].startswith("Available options in"):
        # "In 'dpo': Could not find 'model/llama9'" + the group's options, one a line
        missing = lines[0].split("Could not find ", 1)[-1].strip("'")
        group, _, option = missing.rpartition("/")
        options = []
        for line in lines[2:]:  # the options, one a line, then Hydra's search path
            if line.startswith("Config search path"):
                break
            options.append(line)
        return ConfigError(f"{group}={option}: no such option of config group {group!r}; available:"
                           f" {', '.join(options)}")
    if lines and lines[0].startswith("Ambiguous value for argument"):
        return ConfigError(lines[0], hint="to sweep over the values, add -m (--multirun); for a list use key=[a,b]")
    return ConfigError("; ".join(lines[:3]) or type(exc).__name__)


def compose_with_hydra(name: str, overrides: List[str], schemas: Mapping[str, type], *, multirun: bool = False,
                       job_num: Optional[int] = None):
    """Compose ``<config dir>/<name>.yaml`` with ``overrides``, ``schemas`` (name -> trainer
    schema) registered: the config with its ``hydra`` node."""
    from hydra.errors import HydraException
    from hydra.types import RunMode
    from omegaconf.errors import OmegaConfBaseException

    overrides = list(overrides) + ([f"hydra.job.num={job_num}"] if job_num is not None else [])
    primary = name if name not in schemas or name in top_configs() else f"{GENERATED}/{name}"
    try:
        return hydra_instance(schemas).compose_config(primary, overrides, run_mode=RunMode.MULTIRUN if multirun else RunMode.RUN,
                                              with_log_configuration=False)
    except (HydraException, OmegaConfBaseException) as exc:
        raise composition_error(exc, name) from None


def without_hydra(cfg):
    """The job's part of a composed config: every node but ``hydra``."""
    from omegaconf import OmegaConf

    return OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
