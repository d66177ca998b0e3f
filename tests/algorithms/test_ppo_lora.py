"""PPO with LoRA, one process: the critic as a second adapter set on the policy's own base
(``ppo.critic_lora``) trains only its adapters and value head, shares every base tensor with
the policy, leaves the base unchanged, and gives the values a separately built critic (its
own copy of the base, the same adapter and head values) gives; offloading it leaves the
policy's base in place. Without ``ppo.critic_lora`` the critic is a full model of its own
(every parameter trained, no storage shared with the policy)."""
import pytest
import torch

from aligner.config import ConfigError
from tests.algorithms.ppo_setup import make_assets, ppo_config

LORA = {"enabled": True, "rank": 4, "alpha": 8.0}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("ppo_lora_assets"))


def _storage(params):
    return {p.untyped_storage().data_ptr() for p in params if p.numel()}


def test_critic_as_a_second_adapter_set_on_the_policy_base(assets, tmp_path):
    from aligner.algorithms.ppo import PPOTrainer
    from aligner.models import ModelConfig, build_model, load_hf_weights
    from aligner.models.lora import LoraSettings, adapters_disabled, apply_lora

    trainer = PPOTrainer(ppo_config(assets, str(tmp_path / "run"), lora=LORA, ppo={"critic_lora": True},
                                    trainer={"max_steps": 2}))
    result = trainer.fit()
    loop = trainer.trainer
    policy, critic_role = loop.policy.modules[0], loop.roles["critic"]
    critic = critic_role.modules[0]
    assert "loss/value" in result["train"]

    # the critic trains its adapters and its value head, nothing else
    names = {id(p): n for n, p in critic.named_parameters()}
    optimized = sorted(names[id(p)] for g in critic_role.optimizer.param_groups for p in g["params"])
    trainable = sorted(n for n, p in critic.named_parameters() if p.requires_grad)
    assert optimized == trainable and "head.weight" in optimized
    assert all(".lora_" in n for n in optimized if n != "head.weight")
    # every other tensor is the policy's own parameter: one copy of the base
    policy_params = dict(policy.named_parameters())
    base = [(n, p) for n, p in critic.named_parameters() if not p.requires_grad]
    assert base and all(p is policy_params[n] for n, p in base)
    assert len(critic_role.borrowed) == len(base)

    # the base is the initial HF policy still; the critic's adapters and head trained
    cfg = ModelConfig.from_hf(assets["policy"])
    cfg.pad_token_id = 0
    fresh = build_model(cfg)
    load_hf_weights([fresh], assets["policy"], cfg)
    fresh_params = dict(fresh.named_parameters())
    for n, p in base:
        assert torch.equal(p, fresh_params[n]), n
    assert all(p.abs().max() > 0 for n, p in critic.named_parameters() if n.endswith("lora_B"))

    # a separately built critic (its own base copy) with the same adapter and head values: the same values
    explicit = build_model(cfg, head="value", num_outputs=1)
    load_hf_weights([explicit], assets["policy"], cfg, head="value")
    apply_lora([explicit], cfg, LoraSettings(rank=4, alpha=8.0))
    trained = dict(critic.named_parameters())
    with torch.no_grad():
        for n, p in explicit.named_parameters():
            if p.requires_grad:
                p.copy_(trained[n])
    assert not _storage(explicit.parameters()) & _storage(critic.parameters())
    tokens = torch.tensor([[4, 9, 12, 7, 3, 5], [6, 8, 10, 11, 13, 3]])
    critic.eval()
    explicit.eval()
    with torch.no_grad():
        values, ref = critic(tokens, None, None), explicit(tokens, None, None)
        # and the policy with its adapters off is the base, whatever the critic did
        with adapters_disabled(policy):
            base_logits = policy(tokens, None, None)
        fresh_logits = fresh(tokens, None, None)
    assert values.shape == (2, 6, 1) and values.abs().max() > 0
    assert (values - ref).abs().max() < 1e-6
    assert (base_logits - fresh_logits).abs().max() < 1e-6

    # offloading the critic moves its adapters and head, never the policy's base
    critic_role.offload()
    assert all(p.numel() > 0 for _, p in base) and critic.head.weight.numel() == 0
    critic_role.onload()
    assert critic.head.weight.numel() > 0


def test_without_critic_lora_the_critic_is_a_full_model_of_its_own(assets, tmp_path):
    from aligner.algorithms.ppo import PPOTrainer
    from aligner.models.lora import has_adapters

    trainer = PPOTrainer(ppo_config(assets, str(tmp_path / "run"), lora=LORA))
    trainer.init_parallel()
    policy_models = trainer.build_models()
    roles, _ = trainer.build_roles(policy_models, 48)
    critic = roles["critic"]
    assert has_adapters(policy_models) and not has_adapters(critic.modules)
    params = list(critic.modules[0].parameters())
    optimized = [p for g in critic.optimizer.param_groups for p in g["params"]]
    assert all(p.requires_grad for p in params) and len(optimized) == len(params)
    assert not _storage(params) & _storage(policy_models[0].parameters())
    assert not critic.borrowed


@pytest.mark.parametrize("sections, match", [
    ({"ppo": {"critic_lora": True}}, "ppo.critic_lora = true: .* needs lora.enabled = true"),
    ({"ppo": {"critic_lora": True, "critic_init": "reward"}, "lora": LORA}, "ppo.critic_init = reward: with"),
])
def test_critic_lora_config_errors(assets, tmp_path, sections, match):
    from aligner.algorithms.ppo import PPOTrainer

    with pytest.raises(ConfigError, match=match):
        PPOTrainer(ppo_config(assets, str(tmp_path / "run"), **sections)).fit()
