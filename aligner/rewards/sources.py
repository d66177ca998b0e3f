"""The reward sources (see :mod:`aligner.rewards`). Notation: n responses, A attributes."""
from __future__ import annotations

import importlib
from pathlib import Path
import inspect
import traceback
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch

from aligner.data.datasets import iter_json_objects, render_extra_id
from aligner.data.formats import Conversation, split_prompt_turns
from aligner.data.tokenizer import load_tokenizer
from aligner.data.world import ATTRS, FAMILIES, score_response
from aligner.rewards.readout import ScoringError, require_reward_head
from aligner.training.roles import FrozenRole


class RewardError(RuntimeError):
    """A reward source failed or returned something that is not one finite score per response.

    The command line reports it in one line (the source, the step, the sample) on the rank
    that met it: a sample lives on one data-parallel rank, which may not be rank 0."""

    report_on_any_rank = True
    hint = "aligner --debug (or ALIGNER_DEBUG=1) shows the traceback"


def _named(where: str, field_name: str, value) -> str:
    """How a message names the option or key that gave ``value``: ``--gold 'x'`` for a
    command-line option, ``pg.reward.function = 'x'`` for a config section."""
    return f"{where} {value!r}" if where.startswith("-") else f"{where}.{field_name} = {value!r}"


@dataclass
class RewardBatch:
    """What a reward source scores: n responses (this data-parallel rank's share).

    prompts: the prompt strings (HelpSteer2 turn format, ``Conversation.to_prompt_string``).
    responses: decoded response texts (a final stop token left out).
    metadata: one dict per response (the prompt row's other fields: the world's task,
    reference answers, ... plus ``group``: the prompt's index in the step, and
    ``sample_index``: the global sample index). step: the training step.
    """

    prompts: List[str]
    responses: List[str]
    metadata: List[dict]
    step: int = 0
    sample_indices: List[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.responses)

    def conversation(self, i: int) -> Conversation:
        return Conversation(split_prompt_turns(self.prompts[i]), self.metadata[i].get("system"))


def check_scores(source: str, raw, batch: RewardBatch, attributes: Optional[Sequence[str]] = None
                 ) -> torch.Tensor:
    """``raw`` as a float64 tensor [n] or [n, A]; RewardError (naming ``source``, the step
    and the sample) unless it is one finite score (or A finite scores) per response."""
    n = len(batch)

    def where(i):
        index = batch.sample_indices[i] if i < len(batch.sample_indices) else i
        return f"reward source {source}, step {batch.step}, sample {index} (position {i} of {n})"

    try:
        values = torch.as_tensor(raw.tolist() if hasattr(raw, "tolist") else raw, dtype=torch.float64)
    except (TypeError, ValueError) as exc:
        raise RewardError(f"reward source {source}, step {batch.step}: expected {n} numbers (one per response),"
                          f" got {type(raw).__name__} ({exc})") from None
    if values.dim() == 0 or values.shape[0] != n or values.dim() > 2:
        raise RewardError(f"reward source {source}, step {batch.step}: returned {tuple(values.shape)} scores for"
                          f" {n} responses; expected [{n}] (or [{n}, attributes])")
    if attributes is not None and values.dim() == 2 and values.shape[1] != len(attributes):
        raise RewardError(f"reward source {source}, step {batch.step}: {values.shape[1]} scores per response,"
                          f" expected {len(attributes)} ({list(attributes)})")
    bad = (~torch.isfinite(values)).reshape(n, -1).any(-1).nonzero().flatten().tolist()
    if bad:
        raise RewardError(f"{where(bad[0])}: score {values[bad[0]].tolist()} is not finite"
                          + (f" ({len(bad) - 1} more samples too)" if len(bad) > 1 else ""))
    return values


def _combine(values: torch.Tensor, weights: Optional[Sequence[float]], attributes: Optional[Sequence[str]],
             reward_attribute: Optional[str], source: str) -> torch.Tensor:
    """[n] or [n, A] -> [n]: ``w · ŷ`` with attribute weights, else the named attribute."""
    if values.dim() == 1:
        return values
    if weights is not None:
        w = torch.as_tensor(list(weights), dtype=values.dtype)
        if w.numel() != values.shape[1]:
            raise ValueError(f"reward source {source}: {w.numel()} attribute weights for {values.shape[1]} outputs")
        return values @ w
    if values.shape[1] == 1:
        return values[:, 0]
    if attributes is None or reward_attribute not in attributes:
        raise ValueError(f"reward source {source} has {values.shape[1]} outputs: set attribute_weights, or"
                         f" reward_attribute to one of the attributes {list(attributes or [])}")
    return values[:, list(attributes).index(reward_attribute)]


class RewardSource:
    """Base class: ``score(batch) -> (rewards [n] float64, attribute scores [n, A] or None)``."""

    name = "reward"
    attributes: Optional[List[str]] = None
    role = None  # the frozen role of a source that holds a model (aligner.training.roles.FrozenRole)

    def score(self, batch: RewardBatch) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        raise NotImplementedError

    # frozen-role protocol (aligner.training.roles): sources without a model have nothing to move
    def offload(self) -> None:
        pass

    def onload(self) -> None:
        pass


class FunctionReward(RewardSource):
    """``package.module:function`` (or a callable) of ``(prompts, responses, metadata)``."""

    def __init__(self, function, attributes: Optional[Sequence[str]] = None,
                 attribute_weights: Optional[Sequence[float]] = None, reward_attribute: Optional[str] = None,
                 where: str = "reward"):
        if isinstance(function, str):
            self.name = function
            self.fn = self.resolve(function, where)
        else:
            self.fn = function
            self.name = f"{getattr(function, '__module__', '?')}:{getattr(function, '__qualname__', repr(function))}"
        self.attributes = list(attributes) if attributes else None
        self.weights = list(attribute_weights) if attribute_weights is not None else None
        self.reward_attribute = reward_attribute

    @staticmethod
    def resolve(spec: str, where: str = "reward") -> Callable:
        """The callable ``spec`` names: imported, looked up, callable with ``(prompts,
        responses, metadata)``; else a :class:`ScoringError` naming ``where`` (the option or
        config section that gave it) and what is wrong."""
        named = _named(where, "function", spec)
        module_name, sep, attr = spec.partition(":")
        if not sep or not module_name or not attr:
            raise ScoringError(f"{named}: expected 'package.module:function'")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ScoringError(f"{named}: cannot import module {module_name!r} ({exc})") from None
        except Exception as exc:  # noqa: BLE001 - the user's module failed while it was imported
            raise ScoringError(f"{named}: importing module {module_name!r} raised {type(exc).__name__}: {exc}"
                               f"{_origin(exc)}") from None
        fn = module
        for part in attr.split("."):
            fn = getattr(fn, part, None)
            if fn is None:
                raise ScoringError(f"{named}: module {module_name!r} has no {attr!r}")
        if not callable(fn):
            raise ScoringError(f"{named}: {attr!r} is a {type(fn).__name__}, not a function")
        return FunctionReward.check_signature(fn, named)

    @staticmethod
    def check_signature(fn: Callable, named: str) -> Callable:
        """``fn`` if it can be called with ``(prompts, responses, metadata)``; else a
        :class:`ScoringError` naming ``named`` (how the message names the option)."""
        try:
            signature = inspect.signature(fn)
        except (TypeError, ValueError):  # a builtin without a signature: the call will tell
            return fn
        try:
            signature.bind(None, None, None)
        except TypeError:
            raise ScoringError(f"{named}: takes {signature}; a reward function is called with (prompts,"
                               " responses, metadata)") from None
        return fn

    def score(self, batch):
        try:
            raw = self.fn(list(batch.prompts), list(batch.responses), [dict(m) for m in batch.metadata])
        except Exception as exc:
            raise RewardError(f"reward function {self.name} raised at step {batch.step} on the batch of samples"
                              f" {batch.sample_indices[:1]}..{batch.sample_indices[-1:]}:"
                              f" {type(exc).__name__}: {exc}{_origin(exc)}") from exc
        values = check_scores(f"function {self.name}", raw, batch, self.attributes)
        rewards = _combine(values, self.weights, self.attributes, self.reward_attribute, self.name)
        return rewards, (values if values.dim() == 2 else None)


def _origin(exc: BaseException) -> str:
    """`` (at FILE:LINE)``: where the innermost frame of ``exc``'s traceback is."""
    frames = traceback.extract_tb(exc.__traceback__)
    return f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""


class WorldScorer(RewardSource):
    """The embedded world's ground-truth scorer: each response's five attributes from the
    task in its metadata (``family``, ``answer``, ``args``); the reward is the weighted sum
    with ``attribute_weights``, else ``reward_attribute`` (helpfulness)."""

    name = "world"

    def __init__(self, attribute_weights: Optional[Sequence[float]] = None, reward_attribute: str = "helpfulness",
                 where: str = "reward"):
        self.attributes = list(ATTRS)
        self.weights = list(attribute_weights) if attribute_weights is not None else None
        self.reward_attribute = reward_attribute
        if self.weights is not None and len(self.weights) != len(ATTRS):
            raise ScoringError(f"{_named(where, 'attribute_weights', self.weights)}: the world's scorer has"
                               f" {len(ATTRS)} attributes ({', '.join(ATTRS)}), one weight each")
        if self.weights is None and reward_attribute not in ATTRS:
            raise ScoringError(f"{_named(where, 'reward_attribute', reward_attribute)}: not an attribute of the"
                               f" world's scorer; expected one of {', '.join(ATTRS)}")

    def score(self, batch):
        rows = []
        for i, (meta, text) in enumerate(zip(batch.metadata, batch.responses)):
            if "answer" not in meta or "family" not in meta:
                raise RewardError(f"reward source world, step {batch.step}, sample {batch.sample_indices[i]}: the"
                                  " prompt row has no world task ('family', 'answer'): not an embedded-world prompt")
            s = score_response(meta, text)
            rows.append([float(s[a]) for a in self.attributes])
        values = check_scores("world", rows, batch, self.attributes)
        return _combine(values, self.weights, self.attributes, self.reward_attribute, "world"), values


class RewardModel(RewardSource):
    """An HF reward-model folder at the job's layout (a frozen role).

    Each response is rendered with the reward model's template (``extra_id``, as aligner's
    reward models are trained) and tokenizer: the folder's own tokenizer when it has one,
    else ``tokenizer`` (the policy's). The text is the interface, so policy and reward
    model may use different tokenizers. attributes: names of the head's outputs (checked
    against those its export records: :func:`reward_model_outputs`; default: those);
    attribute_weights or reward_attribute make the scalar reward. where: the option or
    config section that named the folder, for messages.
    """

    def __init__(self, path: str, tokenizer=None, attributes: Optional[Sequence[str]] = None,
                 attribute_weights: Optional[Sequence[float]] = None, reward_attribute: Optional[str] = None,
                 micro_batch_size: int = 8, max_length: Optional[int] = None, params_dtype=torch.float32,
                 where: Optional[str] = None):
        # the model code is megatron-core: loaded with the first reward model, not with the
        # reward kinds (which config checks read)
        from aligner.models.hf import from_pretrained

        self.name = f"model {path}"
        self.path = path
        self.attributes, n_out = reward_model_outputs(path, attributes, where)  # before the model is loaded
        folder = Path(path)
        has_tokenizer = any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model",
                                                             "tokenizer_config.json"))
        self.tokenizer = load_tokenizer(path) if has_tokenizer else tokenizer
        if self.tokenizer is None:
            raise ScoringError(f"{path}: the reward model folder has no tokenizer and none was given")
        chunks, self.model_cfg = from_pretrained(path, head="reward", params_dtype=params_dtype)
        self.role = FrozenRole("reward", chunks)
        self.num_outputs = n_out
        self.weights = list(attribute_weights) if attribute_weights is not None else None
        self.reward_attribute = reward_attribute
        self.micro_batch_size = micro_batch_size
        self.max_length = max_length or self.model_cfg.max_position_embeddings

    def render(self, batch: RewardBatch, i: int) -> torch.Tensor:
        tokens, _ = render_extra_id(self.tokenizer, batch.conversation(i), batch.responses[i], end="extra_id")
        if len(tokens) > self.max_length:
            # keep the response and the end of the prompt: the score is read at the last token
            tokens = tokens[-self.max_length:]
        return torch.tensor(tokens, dtype=torch.long)

    def score(self, batch):
        from aligner.training.scoring import score_sequences  # megatron-core's schedule: see __init__

        sequences = [self.render(batch, i) for i in range(len(batch))]
        values = score_sequences(self.role.chunks, sequences, self.tokenizer.pad_id, self.micro_batch_size)
        values = check_scores(self.name, values.double(), batch, self.attributes)
        if values.dim() == 2 and values.shape[1] == 1 and self.weights is None:
            return values[:, 0], None
        return _combine(values, self.weights, self.attributes, self.reward_attribute, self.name), values

    def offload(self) -> None:
        self.role.offload()

    def onload(self) -> None:
        self.role.onload()


def reward_model_outputs(path: str, attributes: Optional[Sequence[str]] = None,
                         where: Optional[str] = None) -> Tuple[Optional[List[str]], int]:
    """``(output names, number of outputs)`` of the reward model in ``path``, read from its
    files (no model is built): a :class:`ScoringError` for a folder without a trained reward
    head, or for ``attributes`` (names the user gave) that differ from the names its export
    records (config.json ``id2label``) — they would relabel its outputs. Without
    ``attributes`` the recorded names (None if it records none); a one-output head needs no
    names. ``where``: the option or config section that gave the folder, for messages."""
    from aligner.models.hf import head_outputs, read_export_metadata  # megatron-core: for the sources that read a model

    require_reward_head(path, _named(where, "path", path) if where else None)
    n_out = head_outputs(path)
    recorded = read_export_metadata(path).get("labels")
    given = list(attributes) if attributes else None
    if given is None or n_out == 1:
        return (list(recorded) if recorded and n_out > 1 else None), n_out
    named = _named(where, "attributes", given) if where else f"the attributes {given}"
    if recorded is not None and given != list(recorded):
        raise ScoringError(f"{named} differ from the outputs {list(recorded)} that {path}/config.json records"
                           " (id2label)", hint="name the outputs as the reward model records them, in that order")
    if len(given) != n_out:
        raise ScoringError(f"{named} name {len(given)} outputs; the reward model {path} has {n_out}")
    return given, n_out


def check_reward_source(where: str, kind: str, *, path: Optional[str] = None,
                        function: Union[str, Callable, None] = None,
                        attributes: Optional[Sequence[str]] = None,
                        attribute_weights: Optional[Sequence[float]] = None, reward_attribute: Optional[str] = None,
                        prompts: Optional[str] = None, names_key: bool = False) -> None:
    """What can be checked of a reward source before any process group or model exists (a
    run's preflight): a ``model`` folder holds a trained reward head whose recorded output
    names match ``attributes`` and which ``reward_attribute`` or ``attribute_weights`` read;
    a ``function`` (a name, or a Python callable) takes ``(prompts, responses, metadata)``;
    the ``world`` scorer has ``reward_attribute`` and every row of the prompt file
    ``prompts`` is a task of the embedded world. A :class:`ScoringError` naming
    ``where`` (the config section or option) otherwise. ``names_key``: the section has an
    ``attributes`` key naming the outputs (an online algorithm's reward section does)."""
    if kind == "model" and path:
        names, n_out = reward_model_outputs(path, attributes, where)
        if attribute_weights is not None and len(attribute_weights) != n_out:
            raise ScoringError(f"{where}.attribute_weights has {len(attribute_weights)} entries; the reward model"
                               f" {path} has {n_out} outputs")
        picks = attribute_weights is None and reward_attribute is not None and n_out > 1
        if picks and reward_attribute not in (names or []):
            raise ScoringError(f"{where}.reward_attribute = {reward_attribute!r} is not one of the outputs"
                               f" {names} of the reward model {path}" if names else
                               f"{where}: the reward model {path} has {n_out} outputs and records no names for"
                               f" them (config.json id2label); "
                               + (f"name them in {where}.attributes" if names_key else
                                  f"read them by {where}.attribute_weights (one weight per output)"),
                               hint=f"or set {where}.attribute_weights (one weight per output)" if names_key else None)
    elif kind == "function" and callable(function):  # a Python callable, given from Python
        FunctionReward.check_signature(function, _named(where, "function", function))
    elif kind == "function" and function:
        FunctionReward.resolve(function, where)
    elif kind == "world":
        WorldScorer(attribute_weights, reward_attribute or "helpfulness", where)
        if prompts:
            check_world_prompts(prompts, f"{where} world" if where.startswith("-") else f"{where}.kind = world")


def check_world_prompts(path: str, named: str) -> None:
    """Every row of ``path`` carries a task of the embedded world (``family``, ``answer``,
    ``args``, as ``aligner data synth`` writes them), which the world's scorer needs; a
    :class:`ScoringError` naming the file and line of the first that does not (``named``:
    how the message names the option that chose the world's scorer)."""
    for lineno, row in iter_json_objects(path):
        if not (row.get("family") in FAMILIES and isinstance(row.get("answer"), str)
                and isinstance(row.get("args"), list)):
            raise ScoringError(f"{path}:{lineno}: not a prompt of the embedded world (no task fields 'family',"
                               f" 'answer', 'args'), which {named} needs to score its responses",
                               hint="the world's scorer judges the prompts aligner data synth writes; use another"
                                    " reward kind for other prompts")
