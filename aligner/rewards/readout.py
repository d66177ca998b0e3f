"""How a reward model's outputs are read: the names of its head's outputs, the weights that
make the scalar reward, and the template its rows are rendered with — from what the export
recorded (config.json ``id2label``, ``aligner_config.json``), or from options that override
it (docs/reward_models.md). Shared by ``aligner rm``, ``aligner eval``, ``aligner generate``
and the monitor's reward specs; :func:`load_reward_model` loads one for scoring."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from aligner.data.formats import HELPSTEER2_ATTRIBUTES
from aligner.parallel import ParallelConfig, initialize, is_initialized
from aligner.rewards.weights import REWARDBENCH_WEIGHTS_70B, combine_attributes
from aligner.runtime import UserError


class ScoringError(UserError):
    """An option or input that does not fit the reward model or reward source: one line,
    naming it (a :class:`aligner.runtime.UserError`, so the command line reports it without
    a traceback)."""


@dataclass
class RewardReadout:
    """How a reward head's outputs become named scores and one scalar reward.

    names: the N head outputs in order. weights: N numbers, ``reward = weights · outputs``.
    template: the data-layer template the (prompt, response) rows are rendered with.
    source: where the weights came from (for reports).
    """

    names: List[str]
    weights: List[float]
    template: str
    source: str

    def rewards(self, outputs):
        """[n, N] head outputs -> [n] scalar rewards."""
        return combine_attributes(outputs.double(), torch.tensor(self.weights, dtype=torch.float64))


def require_reward_head(model_dir: str, where: Optional[str] = None) -> None:
    """A :class:`ScoringError` unless ``model_dir`` is an HF folder whose checkpoint holds a
    trained reward head (``score.weight``: a ``*ForSequenceClassification`` export, e.g. of
    ``aligner train rm_regression``). A causal LM's folder would load with a randomly
    initialised head and score noise. ``where`` names the option or key that gave the
    folder (default: the folder itself)."""
    from aligner.models.hf import HFReader  # torch and megatron-core: loaded on use, not when a command starts

    where = where or str(model_dir)
    config = Path(model_dir) / "config.json"
    if not config.is_file():
        raise ScoringError(f"{where}: not an HF model folder (no config.json)")
    if HFReader(model_dir).has("score.weight"):
        return
    try:
        architectures = json.loads(config.read_text()).get("architectures") or []
    except ValueError:
        architectures = []
    raise ScoringError(f"{where}: not a reward model: its checkpoint has no reward head ('score.weight')"
                       + (f"; config.json describes a {', '.join(map(str, architectures))}" if architectures else ""),
                       hint="a reward model is an HF *ForSequenceClassification folder, e.g. the hf/ export of"
                            " aligner train rm_regression or rm_bt")


def reward_readout(model_dir: str, num_outputs: int, *, attributes: Optional[Sequence[str]] = None,
                   reward_attribute: Optional[str] = None, attribute_weights: Optional[Sequence[float]] = None,
                   template: Optional[str] = None) -> RewardReadout:
    """The names, weights and template to score with ``model_dir``'s head of ``num_outputs``
    outputs (see the module docstring); a :class:`ScoringError` naming the option when one
    does not match the head."""
    # the export's records are read by the models layer (megatron-core): loaded on first use
    from aligner.models.hf import read_export_metadata

    meta = read_export_metadata(model_dir)
    recorded = meta.get("labels")
    if recorded is not None and len(recorded) != num_outputs:
        raise ScoringError(f"{model_dir}: records {len(recorded)} output names {recorded} for a head of"
                           f" {num_outputs} outputs")
    if attributes:
        attributes = list(attributes)
        if len(attributes) != num_outputs:
            raise ScoringError(f"--attributes names {len(attributes)} outputs {attributes}; the head of {model_dir}"
                               f" has {num_outputs}" + (f": {recorded}" if recorded else ""))
        if recorded is not None and attributes != list(recorded):
            raise ScoringError(f"--attributes {attributes} differ from the head's outputs {recorded}"
                               f" recorded in {model_dir}/config.json")
        names = attributes
    else:
        names = list(recorded) if recorded is not None else [f"LABEL_{i}" for i in range(num_outputs)]
    if attribute_weights is not None and reward_attribute is not None:
        raise ScoringError("--reward-attribute and --attribute-weights both given; the reward is one or the other")
    if attribute_weights is not None:
        if not all(math.isfinite(float(w)) for w in attribute_weights):
            raise ScoringError(f"--attribute-weights {list(attribute_weights)}: expected finite numbers")
        if len(attribute_weights) != num_outputs:
            raise ScoringError(f"--attribute-weights has {len(attribute_weights)} numbers; the head of {model_dir}"
                               f" has {num_outputs} outputs {names}")
        weights, source = [float(w) for w in attribute_weights], "--attribute-weights"
    elif reward_attribute is not None:
        if reward_attribute not in names:
            raise ScoringError(f"--reward-attribute {reward_attribute!r} is not an output of the head of {model_dir}:"
                               f" {names}" + ("" if recorded or attributes else " (name them with --attributes)"))
        weights, source = [float(n == reward_attribute) for n in names], f"--reward-attribute {reward_attribute}"
    elif meta.get("attribute_weights") is not None:
        recorded_weights = meta["attribute_weights"]
        unknown = sorted(set(recorded_weights) - set(names))
        if unknown:
            raise ScoringError(f"{model_dir}: attribute_weights name {unknown}, not outputs of the head {names}")
        weights, source = [float(recorded_weights.get(n, 0.0)) for n in names], "recorded by training"
    elif set(HELPSTEER2_ATTRIBUTES) <= set(names):
        weights = [REWARDBENCH_WEIGHTS_70B.get(n, 0.0) for n in names]
        source = "HelpSteer2 RewardBench weights (70B)"
    elif num_outputs == 1:
        weights, source = [1.0], "the single output"
    else:
        raise ScoringError(f"the head of {model_dir} has {num_outputs} outputs {names} and records no reward"
                           " weights: pass --reward-attribute NAME or --attribute-weights W1 ... WN")
    return RewardReadout(names, weights, template or meta.get("template") or "auto", source)


def load_reward_model(path: str, tp: int = 1, pp: int = 1):
    """An HF reward-model folder at the layout ``tp`` x ``pp`` (initialised here unless it
    exists): ``(chunks, model config, head outputs)``."""
    # the model code is megatron-core: loaded when a reward model is, not with this module
    from aligner.models import ModelConfig, from_pretrained
    from aligner.models.hf import head_outputs

    require_reward_head(path)  # a causal LM's folder would be scored by an untrained head
    cfg = ModelConfig.from_hf(path)
    if not is_initialized():
        initialize(
            ParallelConfig(tp=tp, pp=pp),
            num_layers=cfg.num_layers,
            num_attention_heads=cfg.num_attention_heads,
            num_query_groups=cfg.num_query_groups,
        )
    num_outputs = head_outputs(path)
    models, cfg = from_pretrained(path, head="reward", num_outputs=num_outputs)
    return models, cfg, num_outputs
