"""aligner.models: the GPT policy / reward / value model on megatron-core, HF in and out,
log-probs, training checkpoints, one adapter per HF architecture family
(:mod:`aligner.models.architectures`).

The names below load their module on first use (:func:`aligner.runtime.lazy_exports`):
``aligner.models.config`` and the architecture registry import without torch or
megatron-core, so the config checks stay fast.
"""
from aligner.runtime import lazy_exports

_EXPORTS = {
    "find_latest": "checkpoint",
    "load_checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint",
    "ModelConfig": "config",
    "UnsupportedModelError": "config",
    "attention_mask_from_padding": "gpt",
    "build_model": "gpt",
    "packed_attention_mask": "gpt",
    "packed_position_ids": "gpt",
    "position_ids_from_padding": "gpt",
    "reward_at_last_token": "gpt",
    "unwrap_model": "gpt",
    "CheckpointError": "hf",
    "export_hf": "hf",
    "from_pretrained": "hf",
    "load_hf_weights": "hf",
    "masked_mean": "logprobs",
    "token_entropy": "logprobs",
    "token_logprobs": "logprobs",
}


__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
