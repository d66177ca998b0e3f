"""One set of weights per model kind, made at world size 1 and loaded under any layout."""
import os

from aligner.parallel import ParallelConfig, initialize

KINDS = {"lm": (None, 1), "rm3": ("reward", 3), "rm1": ("reward", 1)}


def _dir(head, n):
    return os.path.join(os.environ["ALIGNER_TEST_WEIGHTS"], f"{head or 'lm'}_{n}")


def make_reference_weights(workdir):
    from megatron.core import dist_checkpointing

    from aligner.models.gpt import build_model
    from tests.training.test_parallel_equivalence import _model_cfg

    os.environ["ALIGNER_TEST_WEIGHTS"] = workdir
    initialize(ParallelConfig(seed=5))
    for head, n in KINDS.values():
        model = build_model(_model_cfg(), head=head, num_outputs=n)
        os.makedirs(_dir(head, n), exist_ok=True)
        dist_checkpointing.save(model.sharded_state_dict(), _dir(head, n))


def load_reference_weights(models, cfg, head, n):
    from megatron.core import dist_checkpointing

    for model in models:
        state = dist_checkpointing.load(model.sharded_state_dict(), _dir(head, n))
        model.load_state_dict(state)
