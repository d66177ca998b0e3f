"""The config machinery every layer's schemas share (docs/configuration.md).

A config section is a dataclass; the layer that owns a concept owns its section
(``aligner.training.config``: model, init, data, parallel, optim, trainer;
``aligner.rewards.config``: reward specs; ``aligner.evaluation.config``: the monitor; each
algorithm module: its own). This module holds what they share:

- :class:`Choice`: a closed choice, an :class:`enum.Enum` whose member names are the
  accepted values, so OmegaConf rejects anything else while the config is composed.
- :func:`registered`: an open choice, a ``str`` field checked against a live registry
  (preference losses, advantage estimators, reward kinds, model families), so that what a
  user registers is accepted without editing an enum.
- :func:`section_check`: registers the checks a type cannot express (ranges,
  combinations) for a section type; :func:`validate_config` runs them on every section of
  that type in a config, after the unknown keys and the choices. What an algorithm checks
  of a whole run is its trainer's ``check`` (aligner.algorithms.base.Trainer).
- :class:`ConfigError`, :func:`check_required`, :func:`plain`.

Choices stay typed (:class:`Choice` members, which compare equal to their values) until
they are used; what reaches megatron-core, a checkpoint or a record is :func:`plain`.
"""
from __future__ import annotations

import dataclasses
from enum import Enum
from typing import Any, Callable, Dict, Iterable, List, Mapping, Union

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from aligner.runtime import UserError


class ConfigError(UserError):
    """A configuration key is unknown, mistyped, unset or out of range; the message names it."""


class Choice(str, Enum):
    """A closed config choice: member names are the accepted values (``str(x)`` is the value)."""

    def __str__(self) -> str:
        return self.value


# ------------------------------------------------------------------------------ open choices
Names = Union[Mapping[str, Any], Callable[[], Iterable[str]]]


def registered(names: Names, default: str) -> Any:
    """A ``str`` field whose value must be a key of the registry ``names`` (a mapping, or a
    function returning the names) at the time the config is checked."""
    return dataclasses.field(default=default, metadata={"registry": names})


def registry_names(names: Names) -> List[str]:
    return list(names() if callable(names) else names)


# ------------------------------------------------------------------------------ section checks
SectionCheck = Callable[[Any, str, DictConfig], None]
SECTION_CHECKS: Dict[type, List[SectionCheck]] = {}


def section_check(schema: type) -> Callable[[SectionCheck], SectionCheck]:
    """Register ``fn(section, key, cfg)`` for every section of type ``schema`` (exactly:
    a subclass registers its own): ``section`` the node, ``key`` its dotted name
    (``"trainer"``, ``"monitor.proxy[0]"``), ``cfg`` the whole config. It raises
    :class:`ConfigError`."""

    def add(fn: SectionCheck) -> SectionCheck:
        SECTION_CHECKS.setdefault(schema, []).append(fn)
        return fn

    return add


def fail(key: str, value: Any, expected: str) -> None:
    """A :class:`ConfigError` ``key = value: expected``."""
    raise ConfigError(f"{key} = {value!r}: {expected}")


# ------------------------------------------------------------------------------ validation
def validate_config(cfg: Any, schema: type, *, require_all: bool = False) -> DictConfig:
    """Merge ``cfg`` (dict / DictConfig / dataclass) onto ``schema`` and check it: unknown
    keys, types and closed choices (OmegaConf), open choices (:func:`registered`), then
    every section's registered checks in config order; with ``require_all``, also unset
    required values. Raises :class:`ConfigError` naming the key. Returns the typed config
    (choices are :class:`Choice` members)."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), cfg)
    except OmegaConfBaseException as exc:
        raise ConfigError(describe_omegaconf_error(exc)) from None
    sections = list(_sections(merged, ""))
    for node, prefix in sections:
        _check_keys_and_choices(node, prefix)
    if require_all:
        check_required(merged)
    try:
        for node, prefix in sections:
            for check in SECTION_CHECKS.get(OmegaConf.get_type(node), []):
                check(node, prefix.rstrip("."), merged)
    except OmegaConfBaseException as exc:  # a value a check needs is itself unset (???)
        raise ConfigError(describe_omegaconf_error(exc)) from None
    return merged


def _sections(node: DictConfig, prefix: str):
    """``(section, "key.")`` for every dataclass-typed node, the root first, lists included."""
    yield node, prefix
    for key in node:
        if OmegaConf.is_missing(node, key):
            continue
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none():
            yield from _sections(child, f"{prefix}{key}.")
        elif isinstance(child, ListConfig) and not child._is_none():
            for i, item in enumerate(child):
                if isinstance(item, DictConfig):
                    yield from _sections(item, f"{prefix}{key}[{i}].")


def _check_keys_and_choices(node: DictConfig, prefix: str) -> None:
    """Keys a schema does not have (Hydra's ``+key=value`` can add them to a structured
    config), and open choices outside their registry."""
    kind = OmegaConf.get_type(node)
    if not dataclasses.is_dataclass(kind):
        return
    fields = {f.name: f for f in dataclasses.fields(kind)}
    for key in node:
        if key not in fields:
            raise ConfigError(f"{prefix}{key}: no such key (the keys of this section: {', '.join(fields)})")
    for name, f in fields.items():
        names = f.metadata.get("registry")
        if names is None or OmegaConf.is_missing(node, name):
            continue
        value, accepted = node[name], registry_names(names)
        if value not in accepted:
            raise ConfigError(f"{prefix}{name}: {value!r} is not accepted; expected one of {', '.join(accepted)}")


def describe_omegaconf_error(exc: BaseException) -> str:
    """One line from an OmegaConf error: ``key: what is wrong`` (the key with its full path)."""
    key = getattr(exc, "full_key", None)
    msg = (getattr(exc, "msg", None) or str(exc)).splitlines()[0].strip()
    if msg.startswith("Invalid value ") and ", expected one of " in msg:
        value, accepted = msg[len("Invalid value "):].split(", expected one of ", 1)
        msg = f"{value} is not accepted; expected one of {accepted.strip('[]')}"
    elif msg.startswith("Key '") and "' not in '" in msg:
        msg = "no such key" + (f" (the keys of this section: {_section_keys(exc)})" if _section_keys(exc) else "")
    return f"{key}: {msg}" if key else msg


def _section_keys(exc) -> str:
    obj = getattr(exc, "object_type", None)
    if obj is not None and dataclasses.is_dataclass(obj):
        return ", ".join(f.name for f in dataclasses.fields(obj))
    return ""


def missing_keys(cfg: DictConfig) -> List[str]:
    """The keys still ``???`` (required values nobody set), dotted, in config order."""
    out: List[str] = []

    def walk(node, prefix):
        for key in node:
            if prefix == "" and key == "hydra":
                continue
            if OmegaConf.is_missing(node, key):
                out.append(prefix + str(key))
            else:
                child = node._get_node(key)
                if isinstance(child, DictConfig):
                    walk(child, f"{prefix}{key}.")

    walk(cfg, "")
    return out


def check_required(cfg: DictConfig, command: str = "aligner train CONFIG", also: Iterable[str] = ()) -> None:
    """Raise ConfigError listing every unset required value (``???``, and the keys ``also``
    names: values a choice made elsewhere requires) with how to set them."""
    unset = missing_keys(cfg) + list(also)
    if unset:
        raise ConfigError(
            f"required value{'s' if len(unset) > 1 else ''} not set: {', '.join(unset)}",
            hint="set on the command line, e.g. " + command + " " + " ".join(f"{k}=..." for k in unset),
        )


def plain(cfg: Any) -> Any:
    """A resolved plain container of ``cfg`` (choices as their string values)."""
    if isinstance(cfg, DictConfig) or OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    return cfg


__all__ = ["Choice", "ConfigError", "SECTION_CHECKS", "check_required", "describe_omegaconf_error", "fail",
           "missing_keys", "plain", "registered", "registry_names", "section_check", "validate_config"]
