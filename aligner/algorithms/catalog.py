"""Every algorithm of the toolkit, imported once so that each registers its trainer
(:data:`aligner.algorithms.registry.TRAINERS`). A new algorithm module is added here."""
from aligner.algorithms import distill, dpo, kto, pg, ppo, reward, sft, spin, steerlm  # noqa: F401  each registers its trainer
from aligner.algorithms.registry import TRAINERS

__all__ = ["TRAINERS"]
