"""The host-memory reference (aligner.training.roles.ReferencePolicy, mode "host") on a
trainable policy role: inside ``active()`` the policy's modules compute the initial
model's logits exactly; on exit (also on an exception) the policy's trained parameters are
back in their own storage, so optimizer steps after the block train the policy and leave
the reference at the initial weights. Where host and device are one memory the block
runs on the host tensors themselves (no copies)."""
import pytest
import torch

from aligner.parallel import ParallelConfig, initialize


def test_host_reference_swaps_in_and_back():
    from aligner.models.gpt import build_model, unwrap_model
    from aligner.parallel import set_seed
    from aligner.training.config import OptimSection
    from aligner.training.forward import forward
    from aligner.training.roles import ReferencePolicy, build_trainable_role, run_schedule
    from tests.training.test_parallel_equivalence import VOCAB, _model_cfg

    initialize(ParallelConfig(seed=5))
    set_seed(5)
    role = build_trainable_role("policy", [build_model(_model_cfg())], OptimSection(lr=1e-2), max_steps=10)
    params = dict(unwrap_model(role.chunks[0]).named_parameters())
    tokens = torch.randint(1, VOCAB, (3, 16), generator=torch.Generator().manual_seed(0))
    batch = {"tokens": tokens, "position_ids": None, "attention_mask": None}

    def logits(chunks):
        with torch.no_grad():
            return forward(chunks[0], batch).detach().clone()

    def train_step():
        role.train()
        role.zero_grad()
        run_schedule(role.chunks, [dict(batch)], forward, lambda b, out: (out.float().pow(2).mean(), 1, {}),
                     forward_only=False)
        role.step()

    role.chunks[0].eval()
    initial = logits(role.chunks)
    reference = ReferencePolicy(role.chunks, "host")
    storage = {n: p.data_ptr() for n, p in params.items()}
    train_step()
    trained = {n: p.detach().clone() for n, p in params.items()}
    assert any(not torch.equal(trained[n], reference._weights[0][n]) for n in params)  # the policy moved
    role.chunks[0].eval()
    moved = logits(role.chunks)
    assert not torch.equal(moved, initial)

    role.train()
    with reference.active() as chunks:
        assert chunks[0] is role.chunks[0] and not chunks[0].training
        assert torch.equal(logits(chunks), initial)
        for n, p in params.items():  # host and device one memory: the host tensors themselves, no copies
            host = reference._weights[0][n]
            assert p.device != host.device or p.data_ptr() == host.data_ptr(), n
    assert role.chunks[0].training  # the mode it had
    for n, p in params.items():
        assert torch.equal(p.detach(), trained[n]), n
        assert p.data_ptr() == storage[n], n  # the policy's own storage, which the optimizer updates
    role.chunks[0].eval()
    assert torch.equal(logits(role.chunks), moved)

    with pytest.raises(RuntimeError, match="inside the block"):
        with reference.active():
            raise RuntimeError("inside the block")
    for n, p in params.items():
        assert torch.equal(p.detach(), trained[n]) and p.data_ptr() == storage[n], n

    train_step()  # trains the policy, not the reference's tensors
    assert any(not torch.equal(p.detach(), trained[n]) for n, p in params.items())
    with reference.active() as chunks:
        assert torch.equal(logits(chunks), initial)
