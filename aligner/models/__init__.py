"""aligner.models: the GPT policy / reward / value model on megatron-core, HF in and out,
log-probs, training checkpoints, one adapter per HF architecture family
(:mod:`aligner.models.architectures`).

The names below are loaded on first use, so that the config layer can list the
architecture families (``aligner.models.architectures``) without importing megatron-core.
"""
import importlib

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

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
