"""The reward sources (see :mod:`aligner.rewards`). Notation: n responses, A attributes."""
from __future__ import annotations

import importlib
from pathlib import Path
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from aligner.data.datasets import render_extra_id
from aligner.data.formats import Conversation, split_prompt_turns
from aligner.data.tokenizer import load_tokenizer
from aligner.data.world import ATTRS, score_response
from aligner.training.roles import FrozenRole


class RewardError(RuntimeError):
    """A reward source failed or returned something that is not one finite score per response."""


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
                 attribute_weights: Optional[Sequence[float]] = None, reward_attribute: Optional[str] = None):
        if isinstance(function, str):
            self.name = function
            self.fn = self.resolve(function)
        else:
            self.fn = function
            self.name = f"{getattr(function, '__module__', '?')}:{getattr(function, '__qualname__', repr(function))}"
        self.attributes = list(attributes) if attributes else None
        self.weights = list(attribute_weights) if attribute_weights is not None else None
        self.reward_attribute = reward_attribute

    @staticmethod
    def resolve(spec: str) -> Callable:
        module_name, sep, attr = spec.partition(":")
        if not sep or not module_name or not attr:
            raise ValueError(f"reward function {spec!r}: expected 'package.module:function'")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ValueError(f"reward function {spec!r}: cannot import module {module_name!r} ({exc})") from None
        fn = module
        for part in attr.split("."):
            fn = getattr(fn, part, None)
            if fn is None:
                raise ValueError(f"reward function {spec!r}: module {module_name!r} has no {attr!r}")
        if not callable(fn):
            raise ValueError(f"reward function {spec!r} is not callable")
        return fn

    def score(self, batch):
        try:
            raw = self.fn(list(batch.prompts), list(batch.responses), [dict(m) for m in batch.metadata])
        except Exception as exc:
            raise RewardError(f"reward function {self.name} raised at step {batch.step} on the batch of samples"
                              f" {batch.sample_indices[:1]}..{batch.sample_indices[-1:]}:"
                              f" {type(exc).__name__}: {exc}") from exc
        values = check_scores(f"function {self.name}", raw, batch, self.attributes)
        rewards = _combine(values, self.weights, self.attributes, self.reward_attribute, self.name)
        return rewards, (values if values.dim() == 2 else None)


class WorldScorer(RewardSource):
    """The embedded world's ground-truth scorer: each response's five attributes from the
    task in its metadata (``family``, ``answer``, ``args``); the reward is the weighted sum
    with ``attribute_weights``, else ``reward_attribute`` (helpfulness)."""

    name = "world"

    def __init__(self, attribute_weights: Optional[Sequence[float]] = None, reward_attribute: str = "helpfulness"):
        self.attributes = list(ATTRS)
        self.weights = list(attribute_weights) if attribute_weights is not None else None
        self.reward_attribute = reward_attribute

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
    model may use different tokenizers. attributes: names of the head's outputs;
    attribute_weights or reward_attribute make the scalar reward.
    """

    def __init__(self, path: str, tokenizer=None, attributes: Optional[Sequence[str]] = None,
                 attribute_weights: Optional[Sequence[float]] = None, reward_attribute: Optional[str] = None,
                 micro_batch_size: int = 8, max_length: Optional[int] = None, params_dtype=torch.float32):
        # the model code is megatron-core: loaded with the first reward model, not with the
        # reward kinds (which config checks read)
        from aligner.models.hf import from_pretrained

        self.name = f"model {path}"
        self.path = path
        folder = Path(path)
        has_tokenizer = any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model",
                                                             "tokenizer_config.json"))
        self.tokenizer = load_tokenizer(path) if has_tokenizer else tokenizer
        if self.tokenizer is None:
            raise ValueError(f"{path}: the reward model folder has no tokenizer and none was given")
        chunks, self.model_cfg = from_pretrained(path, head="reward", params_dtype=params_dtype)
        self.role = FrozenRole("reward", chunks)
        n_out = _head_outputs(chunks)
        self.attributes = list(attributes) if attributes else None
        if self.attributes is not None and len(self.attributes) != n_out:
            if n_out == 1:
                self.attributes = None
            else:
                raise ValueError(f"{path}: the reward model has {n_out} outputs, but {len(self.attributes)}"
                                 f" attributes are named ({self.attributes})")
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


def _head_outputs(chunks) -> int:
    """Outputs of the score head, known on every pipeline stage (the head lives on the last)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    n = [chunks[-1].num_outputs or 1]
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast_object_list(n, src=ps.get_pipeline_model_parallel_last_rank(),
                                   group=ps.get_pipeline_model_parallel_group())
    return int(n[0])
