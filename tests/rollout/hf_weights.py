"""HF checkpoints into the current layout for the tests: see :mod:`aligner.rollout.hf_import`."""
from aligner.rollout.hf_import import load_hf

__all__ = ["load_hf"]
