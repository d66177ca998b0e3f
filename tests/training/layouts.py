"""Shared pieces of the layout tests: a 4-layer model (so PP=2 x VPP=2 has one layer per
chunk), one set of weights per head made at world size 1, data with sizes that are not
multiples of the micro-batch size, and a TrainingLoop factory."""
import os

import torch

VOCAB = 64
HEADS = {"lm": (None, 1), "rm3": ("reward", 3), "rm1": ("reward", 1)}


def model_cfg():
    from aligner.models.config import ModelConfig

    return ModelConfig(
        vocab_size=VOCAB, hidden_size=32, ffn_hidden_size=64, num_layers=4, num_attention_heads=4,
        num_query_groups=2, max_position_embeddings=64, make_vocab_size_divisible_by=16, pad_token_id=0,
        eos_token_id=2,
    )


def build_chunks(head=None, num_outputs=1):
    """This rank's model chunks (one per virtual pipeline stage)."""
    from megatron.core import parallel_state as ps

    from aligner.models.gpt import build_model

    vpp = ps.get_virtual_pipeline_model_parallel_world_size()
    stages = [None] if not vpp else list(range(vpp))
    return [build_model(model_cfg(), head=head, num_outputs=num_outputs, vp_stage=s) for s in stages]


def _weights_dir(root, head, n):
    return os.path.join(root, f"{head or 'lm'}_{n}")


def save_weights(root):
    """Initial weights of every head kind (world size 1, saved with dist_checkpointing)."""
    from megatron.core import dist_checkpointing

    for head, n in HEADS.values():
        (model,) = build_chunks(head, n)
        os.makedirs(_weights_dir(root, head, n), exist_ok=True)
        dist_checkpointing.save(model.sharded_state_dict(), _weights_dir(root, head, n))


def load_weights(chunks, root, head, n):
    from aligner.models.checkpoint import _model_state

    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load(_model_state(chunks), _weights_dir(root, head, n))
    if len(chunks) == 1:
        chunks[0].load_state_dict(state["model"])
    else:
        for i, m in enumerate(chunks):
            m.load_state_dict(state[f"model{i}"])


def sft_samples(n, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        k = int(torch.randint(3, 9, (1,), generator=g))
        body = torch.randint(3, VOCAB, (k,), generator=g)
        tokens = torch.cat([torch.tensor([1]), body, torch.tensor([2]), body.flip(0), torch.tensor([2])])
        mask = torch.cat([torch.zeros(k + 2), torch.ones(k + 1)])
        out.append({"tokens": tokens, "loss_mask": mask, "index": i})
    return out


def regression_samples(n, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        tokens = torch.randint(1, VOCAB, (int(torch.randint(6, 20, (1,), generator=g)),), generator=g)
        labels = torch.randint(0, 5, (3,), generator=g).float()
        mask = (torch.rand(3, generator=g) > 0.3).float()
        out.append({"tokens": tokens, "labels": labels, "label_mask": mask, "index": i})
    return out


def pair_samples(n, seed, subsets=None):
    """Preference pairs; ``subsets``: a subset name per pair (RewardBench-style rows)."""
    g = torch.Generator().manual_seed(seed)

    def seq(lo, hi):
        return torch.randint(1, VOCAB, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g)

    out = []
    for i in range(n):
        prompt, c, r = seq(3, 8), seq(2, 10), seq(2, 10)
        sample = {
            "chosen": torch.cat([prompt, c]),
            "chosen_loss_mask": torch.cat([torch.zeros(len(prompt)), torch.ones(len(c))]),
            "rejected": torch.cat([prompt, r]),
            "rejected_loss_mask": torch.cat([torch.zeros(len(prompt)), torch.ones(len(r))]),
            "strength": float(torch.randint(1, 4, (1,), generator=g)),
            "index": i,
        }
        if subsets is not None:
            sample["subset"] = subsets[i]
        out.append(sample)
    return out


def make_loop(algo, chunks, train, out_dir, *, val=None, steps=3, gbs=8, mbs=2, save_interval=0,
              val_interval=0, warmup_steps=1, lr=1e-2, resume=False, keep_last=5, **trainer_kw):
    from aligner.training.config import OptimSection, TrainerSection
    from aligner.training.loop import TrainingLoop

    return TrainingLoop(
        algo, chunks, train, val_data=val, model_cfg=model_cfg(),
        optim=OptimSection(lr=lr, clip_grad=1.0, warmup_steps=warmup_steps),
        trainer=TrainerSection(
            max_steps=steps, global_batch_size=gbs, micro_batch_size=mbs, out_dir=str(out_dir),
            export_hf=False, progress=False, tensorboard=False, resume=resume, save_interval=save_interval,
            val_interval=val_interval, keep_last=keep_last, **trainer_kw,
        ),
    )


def metrics_rows(out_dir, split="train"):
    import json

    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r for r in rows if r["split"] == split]
