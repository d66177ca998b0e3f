"""Generation from the megatron-core policy in any TP / PP layout (see :mod:`aligner.rollout.engine`)."""
from aligner.rollout.engine import (
    STOP_REASONS,
    GenerationConfig,
    GenerationResult,
    RolloutEngine,
    seed_for,
)

__all__ = ["STOP_REASONS", "GenerationConfig", "GenerationResult", "RolloutEngine", "seed_for"]
