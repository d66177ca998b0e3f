"""Typed configs: the schemas are the one source of defaults, every choice is checked while
the config is composed (naming the key, the value and the accepted ones), every documented
key is overridable without ``+``, and values or combinations that cannot work are refused
before anything starts. No training here: composition and checks only."""
import dataclasses
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from aligner.algorithms.catalog import TRAINERS
from aligner.algorithms.dpo import DPOConfig, DPOTrainer
from aligner.algorithms.losses.preference import PREFERENCE_LOSSES
from aligner.algorithms.reward import BTKind, RewardModelTrainer, RMMode
from aligner.cli.train import compose, compose_with_hydra, sweep_jobs, top_configs
from aligner.config import ConfigError, missing_keys, validate_config
from aligner.models.architectures import model_types
from aligner.runtime import config_dir
from aligner.training.config import DType, ModelSection, OptimSection, ParallelSection, TrainerSection

CONFIGS = ["sft", "dpo", "rm_regression", "rm_bt", "helpsteer2_dpo", "helpsteer2_rm_regression",
           "helpsteer2_rm_helpfulness", "helpsteer2pref_scaled_bt", "ppo", "helpsteer2_ppo", "pg", "rloo", "grpo",
           "helpsteer2pref_reinforce", "steerlm_sft", "steerlm2", "helpsteer2_steerlm2", "spin", "distill", "gkd", "kto"]
ONLINE = {"ppo": "ppo", "helpsteer2_ppo": "ppo", "pg": "pg", "rloo": "pg", "grpo": "pg", "helpsteer2pref_reinforce": "pg"}


def _build(config, overrides):
    trainer_cls, cfg = compose(config, overrides)
    return trainer_cls(cfg)


def test_every_top_level_config_composes_onto_its_schema():
    assert top_configs() == sorted(CONFIGS)
    for name in CONFIGS:
        # PPO also needs its reward source (a reward-model folder by default): the world's scorer here
        trainer_cls, cfg = compose(name, [f"{ONLINE[name]}.reward.kind=world"] if name in ONLINE else [])
        assert trainer_cls is TRAINERS[cfg.algorithm]
        assert OmegaConf.get_type(cfg) is trainer_cls.schema
        # what a run still needs: the data, and for everything but SFT the initial model
        needed = ["data.train"] if name in ("sft", "steerlm_sft", "distill", "gkd") else ["init.hf", "data.train"]
        assert missing_keys(cfg) == needed + (["distill.teacher"] if name in ("distill", "gkd") else [])


def test_choices_are_the_registries_of_the_code_that_uses_them():
    from aligner.algorithms.losses.reward import BT_KINDS
    from aligner.models.config import ModelConfig

    fields = {f.name: f for f in dataclasses.fields(DPOConfig().dpo.__class__)}
    assert fields["loss_type"].metadata["registry"] is PREFERENCE_LOSSES  # checked against the live registry
    assert [m.value for m in BTKind] == list(BT_KINDS)
    arch = {f.name: f for f in dataclasses.fields(ModelSection)}["arch"].metadata["registry"]
    assert sorted(arch()) == model_types()
    # the model section is ModelConfig's fields with ModelConfig's defaults (+ layer_spec)
    model_fields = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.name != "hf_config"}
    section = {f.name: f.default for f in dataclasses.fields(ModelSection)}
    assert set(section) - set(model_fields) <= {"layer_spec"}
    assert set(model_fields) <= set(section)
    for name, default in model_fields.items():
        assert section[name] == default, name


def test_group_presets_do_not_repeat_the_schema_defaults():
    """The schemas are the one source of defaults: a preset holds only what it changes."""
    conf = config_dir()
    for path, schema in [("trainer/default.yaml", TrainerSection), ("optim/adamw.yaml", OptimSection),
                         ("parallel/single.yaml", ParallelSection)]:
        assert yaml.safe_load((conf / path).read_text()) is None, path  # comments only
    schemas = {"trainer": TrainerSection(), "optim": OptimSection(), "parallel": ParallelSection()}
    for group, defaults in schemas.items():
        for path in sorted((conf / group).glob("*.yaml")):
            data = yaml.safe_load(path.read_text()) or {}
            for key, value in data.items():
                if key == "defaults":
                    continue
                assert getattr(defaults, key) != value, f"{path.name}: {key} = {value!r} is the schema default"
    assert not (conf / "data").exists()  # the data section's defaults live in DataSection only


def test_the_drifted_defaults_have_one_value():
    _, sft = compose("sft", [])
    assert sft.trainer.out_dir == "runs/sft" and sft.data.max_length == 160
    _, rec = compose("helpsteer2_rm_regression", [])
    assert rec.data.max_length == 4096 and rec.trainer.out_dir == "runs/rm"
    assert validate_config({"data": {"train": "x"}}, DPOConfig).data.max_length == 2048  # research scripts


@pytest.mark.parametrize("config", ["dpo", "helpsteer2_dpo"])
def test_documented_dpo_keys_override_without_plus(config):
    _, cfg = compose(config, ["dpo.loss_type=rpo_sq", "dpo.eta=2", "dpo.average_log_probs=true",
                              "dpo.preference_weight=0.5", "data.validation=v.jsonl", "data.packing=true",
                              "model.layer_spec=local", "dpo.reference=resident"])
    assert (cfg.dpo.eta, cfg.dpo.average_log_probs, cfg.dpo.preference_weight) == (2.0, True, 0.5)
    assert cfg.data.validation == "v.jsonl" and cfg.data.packing is True and cfg.model.layer_spec == "local"
    assert cfg.dpo.reference == "resident" and cfg.dpo.loss_type == "rpo_sq"


@pytest.mark.parametrize("config", ["rm_regression", "helpsteer2_rm_regression", "helpsteer2pref_scaled_bt"])
def test_documented_rm_keys_override_without_plus(config):
    n = len(compose(config, [])[1].rm.attributes)
    weights = ",".join(["0.5"] * n)
    _, cfg = compose(config, [f"rm.attribute_weights=[{weights}]", "data.validation=v.jsonl", "data.packing=true"])
    assert list(cfg.rm.attribute_weights) == [0.5] * n
    assert cfg.data.validation == "v.jsonl" and cfg.data.packing is True


def test_every_key_of_every_config_is_overridable_without_plus():
    """Override each leaf with its own value, all at once: no key needs ``+``."""
    for name in CONFIGS:
        _, cfg = compose(name, [])
        container = OmegaConf.to_container(cfg, enum_to_str=True)
        overrides = []

        def walk(node, prefix):
            for key, value in node.items():
                if isinstance(value, dict):
                    walk(value, f"{prefix}{key}.")
                elif value != "???":
                    # list items with a comma (SteerLM attribute strings) are quoted, as on a command line
                    text = "null" if value is None else (
                        "[" + ",".join(f"'{v}'" if isinstance(v, str) and "," in v else str(v) for v in value) + "]"
                        if isinstance(value, list) else str(value))
                    if isinstance(value, str) and "$" in value:
                        text = f"'{value}'"
                    overrides.append(f"{prefix}{key}={text}")

        walk(container, "")
        assert len(overrides) > 60
        _, again = compose(name, overrides)
        assert OmegaConf.to_container(again, enum_to_str=True) == container, name


@pytest.mark.parametrize("config,override,key,accepted", [
    ("dpo", "dpo.loss_type=dpoo", "dpo.loss_type", list(PREFERENCE_LOSSES)),
    ("dpo", "dpo.reference=cached", "dpo.reference", ["precompute", "resident"]),
    ("rm_bt", "rm.mode=pairs", "rm.mode", [m.value for m in RMMode]),
    ("rm_bt", "rm.bt_kind=scaledd", "rm.bt_kind", ["regular", "margin", "scaled"]),
    ("sft", "init.dtype=fp16", "init.dtype", [m.value for m in DType]),
    ("sft", "data.template=chatml", "data.template", ["auto", "extra_id", "chat", "raw"]),
    ("sft", "data.overlong=cut", "data.overlong", ["truncate_left", "drop", "error"]),
    ("sft", "optim.schedule=wsd", "optim.schedule", ["constant", "cosine", "linear"]),
    ("sft", "optim.name=lion", "optim.name", ["adam", "sgd"]),
    ("sft", "model.arch=gpt2", "model.arch", model_types()),
    ("sft", "model.layer_spec=tee", "model.layer_spec", ["auto", "te", "fused", "local"]),
    ("sft", "parallel.backend=mpi", "parallel.backend", ["auto", "nccl", "gloo"]),
])
def test_a_wrong_choice_fails_at_compose_naming_key_value_and_choices(config, override, key, accepted):
    with pytest.raises(ConfigError) as err:
        compose(config, [override])
    message = str(err.value)
    value = override.split("=", 1)[1]
    assert message == f"{key}: {value!r} is not accepted; expected one of {', '.join(accepted)}"


@pytest.mark.parametrize("override,expected", [
    ("trainer.max_steps=abc", "trainer.max_steps: Value 'abc' of type 'str' could not be converted to Integer"),
    ("dpo.bogus=1", "dpo.bogus: no such key (the keys of this section: loss_type, beta, average_log_probs,"
                    " sft_weight, preference_weight, eta, gamma, reference)"),
    ("model.num_layrs=3", "model.num_layrs: no such key"),
    ("model=llama9", "model=llama9: no such option of config group 'model'; available: llama3_70b, llama3_8b,"
                     " llama_1b, tiny"),
    ("dpo.beta=0.05,0.1", "Ambiguous value for argument 'dpo.beta=0.05,0.1'"),
])
def test_a_wrong_key_or_type_fails_at_compose(override, expected):
    with pytest.raises(ConfigError) as err:
        compose("dpo", [override])
    assert str(err.value).startswith(expected)
    if override == "model=llama9":  # the options only, not Hydra's search path after them
        assert str(err.value) == expected


def test_a_run_folder_that_cannot_be_written_is_refused_before_anything_starts(tmp_path):
    from aligner.algorithms.sft import SFTTrainer

    train = tmp_path / "sft.jsonl"
    train.write_text('{"prompt": "p", "completion": "c"}\n')
    trainer = SFTTrainer({"data": {"train": str(train), "tokenizer": str(train)},
                          "trainer": {"out_dir": str(train / "run")}})
    with pytest.raises(ConfigError, match=rf"^trainer.out_dir = '{train}/run': {train} is a file, not a folder$"):
        trainer.preflight()


@pytest.mark.parametrize("config,overrides,expected", [
    ("sft", ["trainer.keep_last=0"], "trainer.keep_last = 0: expected >= 1"),
    ("sft", ["trainer.seed=-5"], "trainer.seed = -5: expected an integer in [0, 2**32 - 1]"),
    ("sft", ["trainer.global_batch_size=6", "trainer.micro_batch_size=4"],
     "trainer.global_batch_size = 6 is not a multiple of trainer.micro_batch_size = 4"),
    ("sft", ["optim.min_lr=0.1"], "optim.min_lr = 0.1: expected 0 <= optim.min_lr <= optim.lr = 0.001"),
    ("sft", ["data.max_length=512"], "data.max_length = 512 exceeds model.max_position_embeddings = 256"),
    ("dpo", ["dpo.beta=0"], "dpo.beta = 0.0: expected > 0"),
    ("dpo", ["dpo.eta=2"], "dpo.eta = 2.0 has no effect with dpo.loss_type = 'dpo' (only the rpo_sq, rpo_fwd_kl,"
                           " rpo_bwd_kl losses scale the reward gap)"),
    ("dpo", ["dpo.sft_weight=0", "dpo.preference_weight=0"], "dpo.sft_weight and dpo.preference_weight are both 0"),
    ("dpo", ["dpo.gamma=1"], "dpo.gamma = 1.0 has no effect with dpo.loss_type = 'dpo' (only the simpo losses"),
    ("dpo", ["dpo.loss_type=orpo", "dpo.reference=resident"],
     "dpo.reference = resident has no effect with dpo.loss_type = 'orpo' (a reference-free loss"),
    ("spin", ["spin.sft_weight=-1"], "spin.sft_weight = -1.0: expected >= 0"),
    ("rm_regression", ["data.template=chat"], "data.template = 'chat' does not apply to rm.mode = regression"),
    ("rm_regression", ["rm.bt_kind=scaled"], "rm.bt_kind = 'scaled' has no effect in rm.mode = regression"),
    ("rm_regression", ["rm.attribute_weights=[1,2]"], "rm.attribute_weights has 2 entries; rm.attributes has 5"),
    ("rm_bt", ["rm.reward_attribute=humour"], "rm.reward_attribute = 'humour' is not one of rm.attributes"),
    ("rm_bt", ["rm.attributes=[a,a]"], "rm.attributes = ['a', 'a']: expected one or more distinct names"),
])
def test_values_and_combinations_that_cannot_work_are_refused_before_anything_starts(config, overrides, expected):
    with pytest.raises(ConfigError) as err:
        _build(config, overrides)
    assert str(err.value).startswith(expected)


def test_options_that_do_apply_are_accepted():
    assert _build("dpo", ["dpo.loss_type=rpo_bwd_kl", "dpo.eta=2"]).cfg.dpo.eta == 2.0
    assert _build("dpo", ["dpo.loss_type=simpo", "dpo.gamma=1.2"]).cfg.dpo.gamma == 1.2
    # regression: the weights are recorded with the HF export as the model's reward
    rm = _build("rm_regression", ["rm.attribute_weights=[1,0,0,0,-1]"])
    assert rm.cfg.rm.attribute_weights == [1.0, 0.0, 0.0, 0.0, -1.0] and rm.cfg.rm.mode == "regression"
    # typed past validation; plain strings in what the run folder records
    assert rm.cfg.rm.mode is RMMode.regression and type(rm.recorded()["rm"]["mode"]) is str
    assert isinstance(_build("rm_bt", ["rm.bt_kind=margin"]), RewardModelTrainer)


def test_required_values_are_reported_together_before_any_process_group():
    import torch.distributed as dist

    trainer = _build("dpo", [])
    with pytest.raises(ConfigError) as err:
        trainer.preflight()
    assert str(err.value) == "required values not set: init.hf, data.train"
    assert err.value.hint == "set on the command line, e.g. aligner train dpo init.hf=... data.train=..."
    assert not dist.is_initialized()


def test_research_scripts_get_the_same_checks_without_hydra():
    with pytest.raises(ConfigError, match=r"^dpo.loss_type: 'dpoo' is not accepted; expected one of dpo, ipo"):
        DPOTrainer({"dpo": {"loss_type": "dpoo"}})
    with pytest.raises(ConfigError, match=r"^trainer.keep_last = 0: expected >= 1"):
        DPOTrainer(DPOConfig(trainer=TrainerSection(keep_last=0)))
    trainer = DPOTrainer({"init": {"hf": "/m"}, "data": {"train": "p.jsonl"}, "dpo": {"loss_type": "ipo"}})
    assert trainer.cfg.dpo.loss_type == "ipo" and trainer.cfg.trainer.out_dir == "runs/dpo"


def test_run_folders_follow_hydra_conventions():
    _, cfg = compose("dpo", ["hydra.run.dir=/tmp/elsewhere"])
    assert cfg.trainer.out_dir == "/tmp/elsewhere"
    _, cfg = compose("dpo", ["trainer.out_dir=runs/mine"])
    assert cfg.trainer.out_dir == "runs/mine"
    jobs = sweep_jobs("dpo", ["dpo.beta=0.05,0.1", "trainer.out_dir=runs/sweep", "optim.lr=0.5,0.25"])
    assert [(o, d) for o, d, _ in jobs] == [
        (["dpo.beta=0.05", "trainer.out_dir=runs/sweep", "optim.lr=0.5"], "runs/sweep/0"),
        (["dpo.beta=0.05", "trainer.out_dir=runs/sweep", "optim.lr=0.25"], "runs/sweep/1"),
        (["dpo.beta=0.1", "trainer.out_dir=runs/sweep", "optim.lr=0.5"], "runs/sweep/2"),
        (["dpo.beta=0.1", "trainer.out_dir=runs/sweep", "optim.lr=0.25"], "runs/sweep/3"),
    ]
    assert [job.trainer.out_dir for _, _, job in jobs] == [f"runs/sweep/{i}" for i in range(4)]
    assert [job.dpo.beta for _, _, job in jobs] == [0.05, 0.05, 0.1, 0.1]
    jobs = sweep_jobs("dpo", ["dpo.beta=0.05,0.1", "hydra.sweep.dir=/s", "hydra.sweep.subdir=beta${dpo.beta}"])
    assert [d for _, d, _ in jobs] == ["/s/beta0.05", "/s/beta0.1"]
    full = compose_with_hydra("dpo", [])
    assert full.hydra.run.dir == "runs/dpo" and full.hydra.job.chdir is False


def test_config_folder_of_a_checkout_and_an_override(tmp_path, monkeypatch):
    from aligner.runtime import UserError, config_search_path

    assert config_dir() == Path(__file__).resolve().parents[1] / "conf"
    assert config_search_path() == f"file://{config_dir()}"
    (tmp_path / "mine.yaml").write_text("defaults:\n  - sft_schema\n  - _self_\ndata:\n  max_length: 64\n")
    monkeypatch.setenv("ALIGNER_CONF_DIR", str(tmp_path))
    assert top_configs() == ["mine"]
    assert compose("mine", [])[1].data.max_length == 64
    monkeypatch.setenv("ALIGNER_CONF_DIR", str(tmp_path / "nope"))
    with pytest.raises(UserError, match="ALIGNER_CONF_DIR = .* is not a folder"):
        config_dir()


def test_the_config_groups_table_names_every_group_and_option_there_is():
    """docs/configuration.md's table of config groups lists exactly the folders of conf/ and
    the option files in each (a group that does not exist cannot be chosen)."""
    import re

    text = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    table = text.split("## Config groups", 1)[1].split("\n\n|", 1)[1].split("\n\n", 1)[0]
    documented = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        documented[cells[0].strip("`")] = set(re.findall(r"`([^`]+)`", cells[1]))
    conf = Path(config_dir())
    groups = {d.name: {f.stem for f in d.glob("*.yaml")} for d in conf.iterdir()
              if d.is_dir() and not d.name.startswith("_") and list(d.glob("*.yaml"))}
    assert documented == groups
