"""aligner.models: the GPT policy / reward / value model on megatron-core, HF in and out,
log-probs, training checkpoints."""
from aligner.models.checkpoint import find_latest, load_checkpoint, save_checkpoint
from aligner.models.config import ModelConfig, UnsupportedModelError
from aligner.models.gpt import (
    attention_mask_from_padding,
    build_model,
    packed_attention_mask,
    packed_position_ids,
    position_ids_from_padding,
    reward_at_last_token,
    unwrap_model,
)
from aligner.models.hf import CheckpointError, export_hf, from_pretrained, load_hf_weights
from aligner.models.logprobs import masked_mean, token_entropy, token_logprobs


__all__ = [
    "CheckpointError",
    "ModelConfig",
    "UnsupportedModelError",
    "attention_mask_from_padding",
    "build_model",
    "export_hf",
    "find_latest",
    "from_pretrained",
    "load_checkpoint",
    "load_hf_weights",
    "masked_mean",
    "packed_attention_mask",
    "packed_position_ids",
    "position_ids_from_padding",
    "reward_at_last_token",
    "save_checkpoint",
    "token_entropy",
    "token_logprobs",
    "unwrap_model",
]
