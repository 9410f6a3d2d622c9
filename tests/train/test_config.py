"""Training config: YAML + dotted overrides, type coercion, unknown keys with file/line and a suggestion, round trip."""

from __future__ import annotations

import dataclasses
import typing
from typing import Literal

import pytest

from hermesflow_fast.train.config import (
    ConfigError,
    TrainConfig,
    config_keys,
    config_to_dict,
    load_config,
    save_config,
)

RECIPE = """\
# hermesflow train --config configs/tiny.yaml
# a header comment, as every recipe has
run:
  name: tiny
  seed: 3
train:
  beta: 0.1
  lr: 1e-5            # YAML 1.1 reads this as a string; the schema makes it a float
  adam_betas: [0.9, 0.95]
  max_steps: 20
model:
  config: tiny
  compile: false
data:
  strict: no
"""


def _write(tmp_path, text, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_follow_the_paper_with_bugs_fixed():
    cfg = load_config(None, [])
    assert cfg == TrainConfig()
    t = cfg.train
    assert (t.beta, t.lr, t.weight_decay, t.adam_betas, t.adam_eps) == (0.2, 2e-5, 0.01, [0.9, 0.999], 1e-8)
    assert (t.und_coeff, t.gen_coeff, t.loss_type, t.text_dropout) == (1.0, 1.0, "sigmoid", 0.0)
    assert (t.warmup_steps, t.warmup_ratio, t.max_steps, t.epochs, t.grad_accum) == (0, 0.1, None, 1, 1)
    assert t.batch_size == 4 and t.max_grad_norm == 1.0 and t.nan_policy == "stop"
    assert (cfg.data.max_caption_tokens, cfg.data.t2i_text_len, cfg.data.strict) == (128, 129, True)
    assert (cfg.checkpoint.every, cfg.checkpoint.keep, cfg.dist.strategy) == (100, 3, "ddp")


def test_yaml_then_overrides(tmp_path):
    path = _write(tmp_path, RECIPE)
    cfg = load_config(path, [])
    assert cfg.run.name == "tiny" and cfg.run.seed == 3
    assert cfg.train.lr == 1e-5 and isinstance(cfg.train.lr, float)
    assert cfg.train.adam_betas == [0.9, 0.95] and cfg.train.max_steps == 20
    assert cfg.model.config == "tiny" and cfg.model.compile is False and cfg.data.strict is False

    cfg = load_config(path, ["train.lr=3e-6", "data.strict=true", "model.init_from=/x", "train.max_steps=null",
                             "train.adam_betas=[0.8,0.9]", "model.compile=1", "run.seed=7", "train.lr=4e-6"])
    assert cfg.train.lr == 4e-6  # later overrides win
    assert cfg.data.strict is True and cfg.model.init_from == "/x" and cfg.train.max_steps is None
    assert cfg.train.adam_betas == [0.8, 0.9] and cfg.model.compile is True and cfg.run.seed == 7
    assert cfg.run.name == "tiny"  # untouched keys keep the file's value


@pytest.mark.parametrize(
    ("override", "field", "value"),
    [
        ("train.lr=1e-5", ("train", "lr"), 1e-5),
        ("train.beta=1", ("train", "beta"), 1.0),
        ("train.max_steps=1e3", ("train", "max_steps"), 1000),
        ("train.grad_accum=4", ("train", "grad_accum"), 4),
        ("data.strict=no", ("data", "strict"), False),
        ("data.strict=YES", ("data", "strict"), True),
        ("data.strict=0", ("data", "strict"), False),
        ("log.wandb=on", ("log", "wandb"), True),
        ("model.compile=none", ("model", "compile"), None),
        ("model.config=show_o_512", ("model", "config"), "show_o_512"),
        ("model.init_from=null", ("model", "init_from"), None),
        ("run.name=null", ("run", "name"), "null"),  # a plain str field keeps the text
        ("train.max_grad_norm=null", ("train", "max_grad_norm"), None),
        ("train.adam_betas=[0.9, 0.95]", ("train", "adam_betas"), [0.9, 0.95]),
        ("--train.epochs=2", ("train", "epochs"), 2),
    ],
)
def test_override_coercion(override, field, value):
    cfg = load_config(None, [override])
    got = getattr(getattr(cfg, field[0]), field[1])
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lr=abc", "override 'train.lr=abc': 'train.lr' = 'abc': expected a float"),
        ("train.grad_accum=1.5", "'train.grad_accum' = '1.5': expected an int"),
        ("train.max_steps=lots", "expected an int or null"),
        ("data.strict=maybe", "expected a bool (true/false)"),
        ("train.adam_betas=0.9", "expected a list of floats"),
        ("train.loss_type=dpo", "expected one of 'sigmoid', 'hinge', 'ipo'"),
        ("model.dtype=fp16", "expected one of 'auto', 'fp32', 'bf16'"),
        ("dist.strategy=zero3", "expected one of 'ddp', 'fsdp'"),
        ("train.grad_accum=0", "'train.grad_accum' = 0 must be >= 1"),
        ("train.warmup_ratio=1.0", "'train.warmup_ratio' = 1.0 must be < 1.0"),
        ("train.adam_betas=[0.9]", "'train.adam_betas' = [0.9] must be two numbers in [0, 1)"),
        ("train", "expected key=value"),
        ("train=3", "'train' is a section"),
    ],
)
def test_override_errors_name_key_value_and_type(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)
    assert isinstance(err.value, ValueError)


def test_unknown_key_in_yaml_names_file_line_and_suggestion(tmp_path):
    path = _write(tmp_path, RECIPE.replace("  lr: 1e-5", "  learning_rate: 1e-5"))
    with pytest.raises(ConfigError) as err:
        load_config(path, [])
    assert str(err.value) == f"unknown key 'train.learning_rate' in {path} line 8; did you mean 'train.lr'?"

    path = _write(tmp_path, "trian:\n  lr: 1.0e-5\n")
    with pytest.raises(ConfigError, match=r"unknown key 'trian' in .* line 1; did you mean 'train'\?"):
        load_config(path, [])


@pytest.mark.parametrize(
    ("override", "suggestion"),
    [
        ("train.learning_rate=1", "train.lr"),
        ("train.gradient_accumulation_steps=2", "train.grad_accum"),
        ("train.loss_typ=ipo", "train.loss_type"),
        ("data.token_budgets=9", "data.token_budget"),
        ("trian.beta=0.1", "train.beta"),
        ("checkpoint.save_total_limit=2", "checkpoint.keep"),
        ("train.save_steps=50", "checkpoint.every"),
    ],
)
def test_unknown_override_suggests_closest_key(override, suggestion):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    key = override.split("=")[0]
    assert str(err.value) == f"unknown key '{key}' in override {override!r}; did you mean '{suggestion}'?"


def test_yaml_type_errors_name_file_line_key_value(tmp_path):
    path = _write(tmp_path, "run:\n  name: x\ntrain:\n  epochs: two\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, [])
    assert str(err.value) == f"{path} line 4: 'train.epochs' = 'two': expected an int"
    path = _write(tmp_path, "train:\n  loss_type: dpo\n")
    with pytest.raises(ConfigError, match=r"line 2: 'train.loss_type' = 'dpo': expected one of 'sigmoid'"):
        load_config(path, [])
    path = _write(tmp_path, "train: 3\n")
    with pytest.raises(ConfigError, match=r"line 1: 'train' must be a mapping"):
        load_config(path, [])
    path = _write(tmp_path, "train:\n  beta: 0.1\ntrain:\n  lr: 1.0e-5\n")
    with pytest.raises(ConfigError, match=r"line 3: key 'train' is given twice \(first at line 1\)"):
        load_config(path, [])
    path = _write(tmp_path, "train:\n  beta: -1\n")
    with pytest.raises(ConfigError, match=r"line 2: 'train.beta' = -1.0 must be > 0.0"):
        load_config(path, [])
    path = _write(tmp_path, "train:\n  lr: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path, [])
    with pytest.raises(ConfigError, match="cannot read it"):
        load_config(tmp_path / "missing.yaml", [])


def test_empty_and_comment_only_files_give_defaults(tmp_path):
    assert load_config(_write(tmp_path, ""), []) == TrainConfig()
    assert load_config(_write(tmp_path, "# hermesflow train --config x.yaml\n"), []) == TrainConfig()


def test_save_load_round_trip(tmp_path):
    cfg = load_config(_write(tmp_path, RECIPE), ["model.init_from=/w", "train.max_grad_norm=null",
                                                 "run.name=123", "data.pairs=yes", "train.lr=3.3e-7"])
    out = save_config(cfg, tmp_path / "run" / "config.yaml", header="hermesflow train --config x.yaml\nresolved")
    text = out.read_text()
    assert text.startswith("# hermesflow train --config x.yaml\n# resolved\nrun:\n")
    assert "adam_betas: [0.9, 0.95]" in text
    back = load_config(out, [])
    assert back == cfg
    assert back.run.name == "123" and back.data.pairs == "yes"  # strings that look like numbers/bools stay strings
    assert config_to_dict(back) == config_to_dict(cfg)
    save_config(back, tmp_path / "again.yaml")
    assert (tmp_path / "again.yaml").read_text() == text.split("# resolved\n", 1)[1]


def test_config_to_dict_and_keys():
    d = config_to_dict(TrainConfig())
    assert list(d) == ["run", "model", "data", "train", "checkpoint", "log", "dist"]
    assert d["train"]["adam_betas"] == [0.9, 0.999] and d["model"]["init_from"] is None
    keys = config_keys()
    assert "train" in keys and "train.lr" in keys and "dist.backend" in keys


def test_literals_match_the_ops_they_name():
    from hermesflow_fast.model.attention import BACKENDS
    from hermesflow_fast.ops.dpo import DPO_LOSS_TYPES
    from hermesflow_fast.train import config

    loss = typing.get_type_hints(config.TrainSection)["loss_type"]
    backend = typing.get_type_hints(config.ModelSection)["attn_backend"]
    assert typing.get_origin(loss) is Literal and set(typing.get_args(loss)) == set(DPO_LOSS_TYPES)
    assert set(typing.get_args(backend)) == set(BACKENDS)


@dataclasses.dataclass
class Inner:
    n: int = 1
    mode: Literal["a", "b"] = "a"


@dataclasses.dataclass
class Outer:
    inner: Inner = dataclasses.field(default_factory=Inner)
    tags: list[str] = dataclasses.field(default_factory=list)


def test_custom_schema():
    cfg = load_config(None, ["inner.n=5", "inner.mode=b", "tags=[x, y]"], schema=Outer)
    assert cfg == Outer(Inner(5, "b"), ["x", "y"])
    with pytest.raises(ConfigError, match="did you mean 'inner.mode'"):
        load_config(None, ["inner.mod=a"], schema=Outer)


def test_every_dpo_loss_type_of_the_ops_is_a_train_loss_type():
    from hermesflow_fast.ops.dpo import DPO_LOSS_TYPES
    from hermesflow_fast.train.config import TrainSection

    allowed = typing.get_args(typing.get_type_hints(TrainSection)["loss_type"])
    assert set(allowed) == set(DPO_LOSS_TYPES)


def test_gen_estimator_keys_default_to_one_summed_mask_and_are_checked():
    from hermesflow_fast.train.objective import GEN_LOGP
    from hermesflow_fast.train.resume import config_changes

    t = load_config(None, []).train
    assert (t.rpo_alpha, t.gen_masks, t.gen_logp, t.gen_mask_ratio) == (0.0, 1, "sum", [0.0, 1.0])
    assert set(typing.get_args(typing.get_type_hints(type(t))["gen_logp"])) == set(GEN_LOGP)
    t = load_config(None, ["train.rpo_alpha=1", "train.gen_masks=4", "train.gen_logp=mean",
                           "train.gen_mask_ratio=[0.1,0.9]"]).train
    assert (t.rpo_alpha, t.gen_masks, t.gen_logp, t.gen_mask_ratio) == (1.0, 4, "mean", [0.1, 0.9])
    for override, message in (("train.rpo_alpha=-0.5", "'train.rpo_alpha' = -0.5 must be >= 0"),
                              ("train.gen_masks=0", "'train.gen_masks' = 0 must be >= 1"),
                              ("train.gen_logp=avg", "expected one of 'sum', 'mean'"),
                              ("train.gen_mask_ratio=[0.8,0.2]", "'train.gen_mask_ratio' = \\[0.8, 0.2\\] must be"),
                              ("train.gen_mask_ratio=[0.5]", "must be \\[min, max\\]")):
        with pytest.raises(ConfigError, match=message):
            load_config(None, [override])
    # a run folder written before these keys existed resumes unchanged: a missing key reads as its default
    old = config_to_dict(TrainConfig())
    for key in ("rpo_alpha", "gen_masks", "gen_logp", "gen_mask_ratio"):
        del old["train"][key]
    assert config_changes(old, TrainConfig(), defaults=TrainConfig()) == []
