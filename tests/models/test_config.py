"""Model config (HF config.json and presets) against transformers' own reading of the same
configs; RoPE frequencies against transformers' rotary embedding; mask / position helpers,
masked_mean and reward_at_last_token against hand-computed values. No process group."""
import json

import pytest
import torch

from aligner.models import (ModelConfig, UnsupportedModelError, attention_mask_from_padding, masked_mean,
                            packed_attention_mask, packed_position_ids, position_ids_from_padding,
                            reward_at_last_token)
from aligner.models import architectures
from aligner.models.gpt import rope_inv_freq

PRESETS = ("tiny", "llama_1b", "llama3_8b", "llama3_70b")


def _hf_param_count(cfg: ModelConfig) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_cfg = AutoConfig.for_model(**cfg.to_hf_dict())
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_cfg)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", PRESETS)
def test_presets_build_the_model_transformers_builds(name):
    cfg = ModelConfig.preset(name)
    assert cfg.num_parameters() == _hf_param_count(cfg)
    assert cfg.padded_vocab_size() % 128 == 0 and cfg.padded_vocab_size() - cfg.vocab_size < 128


def test_preset_sizes():
    # published sizes: Llama-3-8B 8,030,261,248 and Llama-3-70B 70,553,706,496 parameters
    assert ModelConfig.preset("llama3_8b").num_parameters() == 8_030_261_248
    assert ModelConfig.preset("llama3_70b").num_parameters() == 70_553_706_496
    assert 0.9e9 < ModelConfig.preset("llama_1b").num_parameters() < 1.5e9
    assert ModelConfig.preset("tiny").num_parameters() < 5e6


def test_preset_overrides_and_bad_keys(tmp_path):
    assert ModelConfig.preset("tiny", vocab_size=1000).vocab_size == 1000
    assert ModelConfig.preset("tiny", vocab_size=1000).padded_vocab_size() == 1024
    bad = tmp_path / "bad.yaml"
    bad.write_text("hidden_size: 64\nnum_layer: 2\n")
    with pytest.raises(ValueError, match=r"bad.yaml: unknown model config keys \['num_layer'\]"):
        ModelConfig.preset(str(bad))
    with pytest.raises(FileNotFoundError, match="no model preset 'nope'.*tiny"):
        ModelConfig.preset("nope")
    with pytest.raises(ValueError, match="num_attention_heads = 6 is not a multiple of.*num_query_groups = 4"):
        ModelConfig(hidden_size=48, num_attention_heads=6, num_query_groups=4)
    with pytest.raises(UnsupportedModelError, match="model.qkv_bias = True does not exist in HF LlamaForCausalLM"):
        ModelConfig(arch="llama", qkv_bias=True)
    assert ModelConfig(arch="qwen2").qkv_bias and not ModelConfig(arch="mistral").qkv_bias


def _llama3_hf():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                       num_attention_heads=8, num_key_value_heads=2, rope_theta=500000.0,
                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                       max_position_embeddings=1024, tie_word_embeddings=True, pad_token_id=3)


def test_from_hf_and_back(tmp_path):
    from transformers import AutoConfig

    _llama3_hf().save_pretrained(tmp_path)  # transformers 5 writes rope_parameters
    cfg = ModelConfig.from_hf(tmp_path)
    assert (cfg.arch, cfg.num_query_groups, cfg.head_dim, cfg.tie_word_embeddings) == ("llama", 2, 32, True)
    assert cfg.rope_theta == 500000.0 and cfg.rope_type == "llama3" and cfg.rope_scaling["factor"] == 8.0
    assert cfg.pad_token_id == 3
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    again = AutoConfig.from_pretrained(out)
    assert again.rope_parameters["rope_type"] == "llama3" and again.rope_parameters["rope_theta"] == 500000.0
    assert ModelConfig.from_hf(out).to_dict() == cfg.to_dict()
    seq = cfg.to_hf_dict(head="reward", num_labels=4)
    assert seq["architectures"] == ["LlamaForSequenceClassification"] and seq["num_labels"] == 4


@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 2.0},
                                     {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}])
def test_rope_frequencies_match_transformers(scaling):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hf = LlamaConfig(hidden_size=256, num_attention_heads=8, rope_theta=500000.0, rope_scaling=scaling,
                     max_position_embeddings=1024)
    rotary = LlamaRotaryEmbedding(hf)
    assert rotary.attention_scaling == 1.0
    torch.testing.assert_close(rope_inv_freq(ModelConfig.from_hf(hf.to_dict())), rotary.inv_freq, atol=0, rtol=1e-6)


def test_unsupported_configs_name_the_file_and_option(tmp_path):
    base = _llama3_hf().to_dict()
    cases = {
        "gelu": (dict(base, hidden_act="gelu"), "hidden_act 'gelu'"),
        "yarn": (dict(base, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}), "'yarn'"),
        "bias": (dict(base, mlp_bias=True), "mlp_bias"),
        "attn_bias": (dict(base, attention_bias=True), "attention_bias = true"),
        "qwen_window": (dict(base, model_type="qwen2", architectures=["Qwen2ForCausalLM"], use_sliding_window=True),
                        "use_sliding_window"),
        "moe": (dict(base, model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"]), "'qwen3_moe'"),
        "jitter": (dict(base, model_type="mixtral", architectures=["MixtralForCausalLM"], num_local_experts=4,
                        num_experts_per_tok=2, router_jitter_noise=0.1), "router_jitter_noise = 0.1"),
    }
    for name, (cfg, needle) in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(UnsupportedModelError) as info:
            ModelConfig.from_hf(tmp_path / name)
        assert needle in str(info.value) and f"{name}/config.json" in str(info.value), name
    (tmp_path / "gqa").mkdir()
    (tmp_path / "gqa" / "config.json").write_text(json.dumps(dict(base, num_key_value_heads=3)))
    with pytest.raises(ValueError, match=r"gqa/config.json: model.num_attention_heads = 8 is not a multiple"):
        ModelConfig.from_hf(tmp_path / "gqa")
    (tmp_path / "short").mkdir()
    (tmp_path / "short" / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(ValueError, match=r"short/config.json: missing key 'vocab_size'"):
        ModelConfig.from_hf(tmp_path / "short")


def test_qwen2_has_qkv_bias_and_mistral_keeps_its_window():
    from transformers import MistralConfig, Qwen2Config

    assert ModelConfig.from_hf(Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2).to_dict()).qkv_bias
    mistral = ModelConfig.from_hf(MistralConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, sliding_window=4096).to_dict())
    assert not mistral.qkv_bias and mistral.sliding_window == 4096
    assert mistral.to_hf_dict()["sliding_window"] == 4096


def test_attention_mask_and_positions():
    pad = torch.tensor([[0, 1, 1], [1, 1, 0]])  # row 0 left-padded, row 1 right-padded
    blocked = attention_mask_from_padding(pad)
    assert blocked.shape == (2, 1, 3, 3) and blocked.dtype == torch.bool
    allowed = (~blocked[:, 0]).int().tolist()
    assert allowed[0] == [[0, 0, 0], [0, 1, 0], [0, 1, 1]]
    assert allowed[1] == [[1, 0, 0], [1, 1, 0], [1, 1, 0]]
    assert position_ids_from_padding(pad).tolist() == [[0, 0, 1], [0, 1, 0]]
    seg = torch.tensor([[0, 0, 1, 1, 1, -1]])
    assert packed_position_ids(seg).tolist() == [[0, 1, 0, 1, 2, 0]]
    allowed = (~packed_attention_mask(seg)[0, 0]).int().tolist()
    assert allowed[3] == [0, 0, 1, 1, 0, 0] and allowed[1] == [1, 1, 0, 0, 0, 0] and allowed[5] == [0] * 5 + [1]


def test_masked_mean_and_reward_at_last_token():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    assert masked_mean(x, mask).item() == 1.5
    assert masked_mean(x, mask, dim=-1).tolist() == [1.5, 0.0]  # nothing selected: 0, not nan
    assert masked_mean(x, torch.ones_like(x), dim=0).tolist() == [2.5, 3.5, 4.5]
    values = torch.arange(2 * 4 * 2, dtype=torch.float).reshape(2, 4, 2)  # [b, s, N]
    assert reward_at_last_token(values, torch.tensor([3, 4])).tolist() == [[4.0, 5.0], [14.0, 15.0]]
    with pytest.raises(ValueError, match="lengths"):
        reward_at_last_token(values, torch.tensor([0, 5]))


# -- the architecture families -------------------------------------------------------------
def _family_config(family, **changes):
    """A small transformers config of ``family`` as its config.json dict, with ``changes``."""
    import transformers as tf

    classes = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config, "qwen3": tf.Qwen3Config,
               "gemma2": tf.Gemma2Config, "gemma3_text": tf.Gemma3TextConfig, "phi3": tf.Phi3Config,
               "olmo2": tf.Olmo2Config, "nemotron": tf.NemotronConfig, "mixtral": tf.MixtralConfig}
    hf = classes[family](vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2).to_dict()
    return {**hf, "architectures": [architectures.get(family).causal_lm], "pad_token_id": 0, **changes}


def _holds(got, want) -> bool:
    """``got`` equals ``want``; for dicts, holds each of ``want``'s keys with a value that does."""
    if isinstance(want, dict):
        return isinstance(got, dict) and all(k in got and _holds(got[k], v) for k, v in want.items())
    return got == want


FAMILY_NAMES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "olmo2", "nemotron",
                "mixtral"]
# each family as transformers defaults it, then with the options that change shapes or the config
FAMILY_VARIANTS = [(family, {}) for family in FAMILY_NAMES] + [
    ("llama", dict(tie_word_embeddings=True, rope_parameters={
        "rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})),
    ("mistral", dict(sliding_window=16, head_dim=24)),
    ("qwen2", dict(tie_word_embeddings=False)),
    ("qwen3", dict(head_dim=24, tie_word_embeddings=True)),
    ("gemma2", dict(head_dim=32, sliding_window=16, query_pre_attn_scalar=20, attn_logit_softcapping=8.0,
                    final_logit_softcapping=12.0, tie_word_embeddings=False,
                    layer_types=["full_attention", "sliding_attention", "full_attention"])),
    ("gemma3_text", {"head_dim": 32, "sliding_window": 16, "final_logit_softcapping": 12.0,
                     "layer_types": ["sliding_attention"] * 2 + ["full_attention"], "rope_parameters": {
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0},
                         "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e4}}}),
    ("phi3", {"sliding_window": 24, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                                        "partial_rotary_factor": 0.75}}),
    ("olmo2", dict(num_key_value_heads=4)),
    ("nemotron", {"tie_word_embeddings": True, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                                                   "partial_rotary_factor": 0.25}}),
]


@pytest.mark.parametrize("family,changes", FAMILY_VARIANTS)
def test_every_family_is_registered_and_counts_the_parameters_transformers_builds(family, changes):
    """The weight rules name every HF tensor with its shape: their sizes add up to the
    parameter count of transformers' model; and config.json goes out and back unchanged,
    as transformers reads it (the options given included)."""
    from transformers import AutoConfig

    assert family in architectures.model_types()
    cfg = ModelConfig.from_hf(_family_config(family, **changes))
    assert cfg.arch == family
    assert cfg.num_parameters() == _hf_param_count(cfg)
    # written from the fields alone (as for a model trained from scratch), not the source's keys
    exported = AutoConfig.for_model(**ModelConfig.from_dict(cfg.to_dict()).to_hf_dict())
    for key, value in changes.items():
        assert _holds(getattr(exported, key), value), (key, getattr(exported, key), value)
    again = ModelConfig.from_hf(exported.to_dict())
    assert again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize("family,changes,needle", [
    ("qwen3", dict(use_sliding_window=True), "use_sliding_window = true"),
    ("qwen3", dict(attention_bias=True), "attention_bias = true"),
    ("gemma2", dict(use_bidirectional_attention=True), "use_bidirectional_attention = true"),
    ("gemma2", dict(hidden_activation="gelu"), "hidden_activation 'gelu'"),
    ("gemma3_text", dict(attn_logit_softcapping=50.0), "attn_logit_softcapping = 50.0"),
    ("gemma3_text", {"rope_parameters": {"sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
                                         "full_attention": {"rope_type": "default", "rope_theta": 1e6}}},
     "rope_parameters.sliding_attention"),
    ("phi3", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 8,
                                  "long_factor": [1.0] * 8}}, "rope_parameters.rope_type = 'longrope'"),
    ("olmo2", dict(attention_bias=True), "attention_bias = true"),
    ("nemotron", dict(mlp_bias=True), "mlp_bias = true"),
    ("nemotron", dict(hidden_act="gelu"), "hidden_act 'gelu'"),
    ("gemma3_text", dict(model_type="gemma3", architectures=["Gemma3ForConditionalGeneration"]), "'gemma3'"),
    ("gemma3_text", {"rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                                         "full_attention": {"rope_type": "default", "rope_theta": 1e6,
                                                            "partial_rotary_factor": 0.5}}},
     "model.partial_rotary_factor = 0.5 does not exist in HF Gemma3ForCausalLM"),
])
def test_family_options_not_computed_exactly_are_refused_naming_key_and_value(tmp_path, family, changes, needle):
    (tmp_path / "config.json").write_text(json.dumps(_family_config(family, **changes)))
    with pytest.raises(UnsupportedModelError) as info:
        ModelConfig.from_hf(tmp_path)
    message = str(info.value)
    assert needle in message and str(tmp_path / "config.json") in message and "\n" not in message, message


def _tokenizer_folder(path):
    """``path`` created with a two-word tokenizer in it (what a model folder needs beside its config)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    path.mkdir()
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token="a")),
                            eos_token="b").save_pretrained(path)
    return path


def test_an_unsupported_model_is_one_error_line_and_exit_2(tmp_path, capsys):
    """Before any process group or model: ``aligner generate`` on a multimodal Gemma 3."""
    from aligner.cli.main import main

    model = _tokenizer_folder(tmp_path / "model")
    (model / "config.json").write_text(json.dumps(_family_config(
        "gemma3_text", model_type="gemma3", architectures=["Gemma3ForConditionalGeneration"])))
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": "a b"}) + "\n")
    code = main(["generate", "--model", str(model), "--prompts", str(tmp_path / "prompts.jsonl"),
                 "--output", str(tmp_path / "out.jsonl")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"aligner generate: error: {model / 'config.json'}: model_type 'gemma3'")
    assert "supported model types: ['gemma2', 'gemma3_text', 'llama'" in err[0]


# one value per family-only ModelConfig field (architectures.base.OPTIONS), valid together
OPTION_VALUES = dict(sliding_window=16, layer_types=["sliding_attention", "full_attention"] * 2,
                     partial_rotary_factor=0.5, query_pre_attn_scalar=20.0, attn_logit_softcapping=8.0,
                     final_logit_softcapping=12.0, rope_local_theta=1000.0, num_experts=4, moe_router_topk=2)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_fields_of_other_families_are_refused(family):
    """A field the family's transformers class ignores is an error, not a silent difference:
    each family takes its own options together and refuses every other one, naming it."""
    from aligner.models.architectures.base import OPTIONS

    adapter = architectures.get(family)
    assert set(OPTION_VALUES) == set(OPTIONS)
    own = {name: OPTION_VALUES[name] for name in adapter.options}
    cfg = ModelConfig(arch=family, **own)
    assert all(getattr(cfg, name) == value for name, value in own.items())
    for name in sorted(set(OPTIONS) - set(adapter.options)):
        with pytest.raises(UnsupportedModelError) as info:
            ModelConfig(arch=family, **own, **{name: OPTION_VALUES[name]})
        assert str(info.value) == (f"model.{name} = {OPTION_VALUES[name]!r} does not exist in HF {adapter.causal_lm}"
                                   f" (model.arch = {family})")


def test_family_fields_left_unset_take_the_transformers_defaults():
    from transformers import Gemma3TextConfig

    local = Gemma3TextConfig().rope_parameters["sliding_attention"]["rope_theta"]
    assert ModelConfig(arch="gemma3_text").rope_local_theta == local == 10000.0
    assert ModelConfig(arch="gemma3_text", rope_local_theta=1000.0).rope_local_theta == 1000.0
    assert ModelConfig(arch="mistral", sliding_window=16).windowed_layers() == [True] * 4
    gemma = ModelConfig(arch="gemma2", num_layers=2, sliding_window=8, layer_types=["sliding_attention", "full_attention"])
    assert gemma.windowed_layers() == [True, False]
    with pytest.raises(ValueError, match=r"model.layer_types has sliding_attention layers but model.sliding_window"):
        ModelConfig(arch="gemma2", num_layers=2, layer_types=["sliding_attention", "full_attention"])
    with pytest.raises(ValueError, match=r"model.partial_rotary_factor = 0.3: expected a share of head_dim = 32"):
        ModelConfig(arch="phi3", partial_rotary_factor=0.3)


def test_train_refuses_a_model_it_cannot_compute_in_one_line_before_any_work(tmp_path, capsys):
    """``aligner train sft init.hf=<Qwen3 with use_sliding_window>``: one line naming the key
    and value, exit 2, no run folder written."""
    from aligner.cli.main import main

    model = _tokenizer_folder(tmp_path / "model")
    (model / "config.json").write_text(json.dumps(_family_config("qwen3", use_sliding_window=True, sliding_window=16)))
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
                    + "\n")
    out = tmp_path / "run"
    code = main(["train", "sft", f"init.hf={model}", f"data.train={data}", "data.template=raw",
                 f"trainer.out_dir={out}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("aligner train: error: ") and "use_sliding_window = true is not supported" in err[0]
    assert str(model / "config.json") in err[0] and not out.exists()


def test_te_spec_is_not_built_for_layers_it_lacks():
    from aligner.models.layer_spec import LayerDesign, build_layer_spec, te_builds

    assert te_builds(LayerDesign()) and te_builds(LayerDesign(qk_norm="head"))
    for design in (LayerDesign(norms="sandwich"), LayerDesign(qk_norm="projection"), LayerDesign(softcap=30.0),
                   LayerDesign(local_rope=True)):
        assert not te_builds(design)
        with pytest.raises(ValueError, match="model.layer_spec = te: Transformer Engine's layer spec does not build"):
            build_layer_spec("te", design)


def test_env_lists_the_families_with_their_layer_specs(capsys):
    from aligner.cli import main as cli

    assert cli.main(["env", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)["architectures"]
    assert list(table) == architectures.model_types()
    assert table["gemma2"]["class"] == "Gemma2ForCausalLM" and table["gemma2"]["layer_specs"] == "fused, local"
    assert table["qwen3"]["layer_specs"] == "te, fused, local"
    # Transformer Engine's spec builds the families made of megatron-core's own layer options
    te = {name for name, row in table.items() if row["layer_specs"] == "te, fused, local"}
    assert te == {"llama", "mistral", "mixtral", "nemotron", "phi3", "qwen2", "qwen3"}
    assert all(row["layer_specs"] == "fused, local" for name, row in table.items() if name not in te)
    assert "q/k RMSNorm over the whole projection" in table["olmo2"]["features"]
    assert cli.main(["env"]) == 0
    rows = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    assert rows["arch.nemotron"].startswith("NemotronForCausalLM") and "squared-ReLU" in rows["arch.nemotron"]


def test_expert_parallel_layouts_are_checked_before_any_work(monkeypatch):
    """EP = 2 over two data-parallel ranks passes; what does not divide is one line naming
    the config keys and numbers."""
    from omegaconf import OmegaConf

    from aligner.config import ConfigError
    from aligner.training.preflight import check_model

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    moe = ModelConfig.from_hf(_family_config("mixtral", num_local_experts=4))
    cfg = OmegaConf.create({"data": {"max_length": 64}, "parallel": {"tp": 1, "pp": 1, "vpp": None, "cp": 1, "ep": 2,
                                                                      "backend": "gloo", "sequence_parallel": False}})
    check_model(cfg, moe)  # each rank holds 2 of the 4 experts
    with pytest.raises(ConfigError,
                       match=r"^model.num_experts = 3 is not divisible by parallel.ep = 2 \(world size 2\)$"):
        check_model(cfg, ModelConfig.from_hf(_family_config("mixtral", num_local_experts=3)))
    cfg.parallel.ep = 4
    with pytest.raises(ConfigError, match=r"^parallel.ep = 4 must divide data-parallel x context-parallel size"
                                          r" 2 \* 1 = 2 \(world size 2\)$"):
        check_model(cfg, moe)
    cfg.parallel.ep = 2
    check_model(cfg, ModelConfig.from_hf(_family_config("llama")))  # a dense model: ep is a layout only
