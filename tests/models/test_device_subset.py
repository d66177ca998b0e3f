"""The GPU suite's test subset: world size 1 on the accelerator (NCCL), the layer spec
``auto`` picks there (TE if it can run, else fused).

- HF parity: a small Llama imported from transformers gives transformers' logits on a
  right-padded batch (fp32, 1e-4); in bf16 both agree on the next token almost everywhere;
- generation parity: the rollout engine's greedy tokens equal transformers' ``generate``
  (fp32, KV cache);
- DPO step 0: policy and reference log-probs identical, loss ln 2 (fp32), also in bf16
  parameters (then within bf16 rounding of the fp32 log-probs computed from bf16 logits).

Skipped without CUDA unless ``ALIGNER_DEVICE_SUBSET_ON_CPU=1`` (how the script itself is
checked on a CPU machine; the CPU suite covers these on CPU elsewhere).
"""
import math
import os

import pytest
import torch

from aligner.parallel.spawn import spawn_local

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("ALIGNER_DEVICE_SUBSET_ON_CPU") != "1",
    reason="the device subset runs on a GPU (ALIGNER_DEVICE_SUBSET_ON_CPU=1 runs it here)",
)

VOCAB = 100


def _hf_model(path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                      initializer_range=0.1, eos_token_id=None)
    LlamaForCausalLM(cfg).save_pretrained(path)


def _on_device(path):
    from transformers import LlamaForCausalLM

    from aligner.algorithms.dpo import DPOAlgorithm
    from aligner.models import from_pretrained
    from aligner.models.layer_spec import describe_layer_spec
    from aligner.parallel import ParallelConfig, get_device, initialize
    from aligner.rollout import GenerationConfig, RolloutEngine
    from aligner.training.config import OptimSection, TrainerSection
    from aligner.training.loop import TrainingLoop

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 parity means fp32 arithmetic
    torch.backends.cudnn.allow_tf32 = False
    initialize(ParallelConfig(seed=0))
    device = get_device()
    out = {"device": str(device), "spec": describe_layer_spec(),
           "backend": torch.distributed.get_backend()}
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, VOCAB, (3, 12), generator=g)
    lengths = [12, 9, 5]
    for i, n in enumerate(lengths):
        tokens[i, n:] = 0
    keep = torch.arange(12)[None] < torch.tensor(lengths)[:, None]
    for dtype in (torch.float32, torch.bfloat16):
        hf = LlamaForCausalLM.from_pretrained(path, torch_dtype=dtype).to(device).eval()
        models, cfg = from_pretrained(path, params_dtype=dtype)
        with torch.no_grad():
            ours = models[0](tokens.to(device), None, None)[..., :VOCAB].float().cpu()
            ref = hf(tokens.to(device), attention_mask=keep.long().to(device)).logits.float().cpu()
        key = "fp32" if dtype == torch.float32 else "bf16"
        out[f"logits_maxdiff_{key}"] = float((ours - ref).abs()[keep].max())
        out[f"argmax_agree_{key}"] = float((ours.argmax(-1) == ref.argmax(-1))[keep].float().mean())
        if dtype == torch.float32:
            prompts = torch.randint(3, VOCAB, (4, 6), generator=g)
            engine = RolloutEngine(models, cfg)
            result = engine.generate(prompts.tolist(), GenerationConfig(max_new_tokens=10, greedy=True,
                                                                        stop_token_ids=[]))
            with torch.no_grad():
                expected = hf.generate(prompts.to(device), attention_mask=torch.ones_like(prompts).to(device),
                                       max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
            out["generation_equal"] = torch.equal(result.tokens[:, :16].cpu(), expected[:, :16].cpu())
        # DPO step 0: the reference is the initial policy
        pairs = []
        for i in range(8):
            p, c, r = (torch.randint(3, VOCAB, (n,), generator=g) for n in (5, 4, 6))
            pairs.append({"chosen": torch.cat([p, c]), "rejected": torch.cat([p, r]), "index": i,
                          "chosen_loss_mask": torch.cat([torch.zeros(5), torch.ones(4)]),
                          "rejected_loss_mask": torch.cat([torch.zeros(5), torch.ones(6)])})
        loop = TrainingLoop(DPOAlgorithm(pad_id=0, beta=0.1), models, pairs, optim=OptimSection(lr=1e-3),
                            trainer=TrainerSection(max_steps=1, global_batch_size=8, micro_batch_size=4,
                                                   out_dir=f"{path}/dpo_{key}", progress=False, tensorboard=False,
                                                   export_hf=False, resume=False))
        loop.algorithm.setup(loop)
        first = loop.train_step()
        out[f"dpo_{key}"] = {k: first[k] for k in ("loss", "rewards/margins", "rewards/chosen")}
    return out


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("device_subset"))
    _hf_model(path)
    return spawn_local(_on_device, 1, path, timeout=600)[0]


def test_runs_on_the_accelerator(result):
    if torch.cuda.is_available():
        assert result["device"].startswith("cuda") and result["backend"] == "nccl"
    assert result["spec"].split(":")[0] in ("te", "fused")


def test_hf_parity(result):
    assert result["logits_maxdiff_fp32"] < 1e-4
    assert result["argmax_agree_bf16"] >= 0.9
    assert result["logits_maxdiff_bf16"] < 0.1


def test_generation_parity(result):
    assert result["generation_equal"]


def test_dpo_step0(result):
    fp32, bf16 = result["dpo_fp32"], result["dpo_bf16"]
    assert fp32["rewards/margins"] == 0.0 and fp32["rewards/chosen"] == 0.0
    assert abs(fp32["loss"] - math.log(2)) < 1e-6
    assert bf16["rewards/margins"] == 0.0 and abs(bf16["loss"] - math.log(2)) < 1e-6
