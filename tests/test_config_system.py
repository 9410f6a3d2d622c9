"""One config system (hermesflow_fast/config.py): every knob of every job is declared once, with its one default, and
nothing else carries a default of its own for it: not the functions that consume a section, not the command-line
options made from the schema, not the demo (it runs the shipped recipe file)."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil

import click
import pytest

from hermesflow_fast.cli import main
from hermesflow_fast.config import (
    RENAMED_KEYS,
    ConfigError,
    config_keys,
    knob_default,
    load_config,
    recipe_path,
    validate,
)
from hermesflow_fast.selfplay.config import CurationSection, DataSection, SelfPlayConfig
from hermesflow_fast.train.config import TrainConfig
from hermesflow_fast.world.config import EvalSection, PretrainConfig, WorldSection

SCHEMAS = (TrainConfig, SelfPlayConfig, PretrainConfig)
# the sections whose knobs selfplay/ and world/ functions consume (a function takes the section, not the knob)
CONSUMED = (CurationSection, EvalSection, WorldSection, DataSection, PretrainConfig)


def _leaves(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if not dataclasses.is_dataclass(f.default_factory)]


@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda s: s.__name__)
def test_every_knob_is_declared_once_with_default_and_help(schema):
    def walk(cls):
        for f in dataclasses.fields(cls):
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                pytest.fail(f"{cls.__name__}.{f.name} has no default")
            sub = f.default_factory if f.default_factory is not dataclasses.MISSING else None
            if dataclasses.is_dataclass(sub):
                walk(sub)
            else:
                assert f.metadata.get("help"), f"{cls.__name__}.{f.name} is not a knob() (no help)"

    walk(schema)
    keys = config_keys(schema)
    assert len(keys) == len(set(keys))


# The file readers' ``strict=True`` (refuse bad input unless told otherwise) is the one exception: a library call
# reading a records or question file is strict by default, as data.strict is (checked below); a run passes its own.
READER_STRICT = {"hermesflow_fast.selfplay.tifa.load_tifa_questions", "hermesflow_fast.selfplay.sources."
                 "read_real_records"}


def test_functions_take_sections_not_knob_defaults():
    """No function in selfplay/ or world/ gives a knob of a consumed section a default of its own."""
    knobs = {f.name for cls in CONSUMED for f in _leaves(cls)}
    found = []
    for pkg in ("selfplay", "world"):
        mod = importlib.import_module(f"hermesflow_fast.{pkg}")
        for info in pkgutil.iter_modules(mod.__path__):
            m = importlib.import_module(f"hermesflow_fast.{pkg}.{info.name}")
            for name, fn in inspect.getmembers(m, inspect.isfunction):
                if fn.__module__ != m.__name__:
                    continue
                for p in inspect.signature(fn).parameters.values():
                    if p.name in knobs and p.default is not inspect.Parameter.empty:
                        if p.name == "strict" and f"{m.__name__}.{name}" in READER_STRICT:
                            assert p.default == DataSection().strict
                            continue
                        found.append(f"{m.__name__}.{name}({p.name}={p.default!r})")
    assert not found, found


@pytest.mark.parametrize("command,schema,recipe", [("eval", SelfPlayConfig, "selfplay-shapes"),
                                                   ("pretrain", PretrainConfig, None)])
def test_cli_options_default_to_the_schema(command, schema, recipe):
    """The knob options of `hermesflow eval` / `pretrain` are made from the schema: default None (the schema, or the
    recipe, decides) and the default shown in --help is the one in effect."""
    cmd = main.commands[command]
    leaves = {f.name for f in _leaves(schema)}
    knob_params = [p for p in cmd.params if isinstance(p, click.Option) and ("__" in p.name or p.name in leaves)]
    assert knob_params
    shown = load_config(recipe, schema=schema) if recipe else schema()
    for p in knob_params:
        key = p.name.replace("__", ".")
        assert p.default is None, (command, p.name, p.default)
        value = shown
        for part in key.split("."):
            value = getattr(value, part)
        assert f"[default: {recipe + ': ' if recipe else ''}{value}]" in p.help, (p.name, p.help)


def test_eval_section_defaults_are_the_pretrain_evaluation():
    assert PretrainConfig().eval == EvalSection()
    assert knob_default(SelfPlayConfig, "eval.steps") == knob_default(PretrainConfig, "eval.steps")


def test_shipped_recipes_resolve_by_name_and_by_path():
    assert recipe_path("selfplay-shapes") == recipe_path("configs/selfplay-shapes.yaml").resolve()
    assert recipe_path("tiny.yaml").name == "tiny.yaml"
    with pytest.raises(ConfigError, match="not a shipped recipe.*selfplay-shapes"):
        recipe_path("no-such-recipe")
    assert load_config("selfplay-shapes", schema=SelfPlayConfig).curation.images_per_prompt == 6


def test_renamed_key_is_read_under_its_new_name(tmp_path, capsys):
    old, new = "data.text_budget", RENAMED_KEYS["data.text_budget"]
    cfg = load_config(None, [f"{old}=24"], schema=TrainConfig)
    assert cfg.data.max_caption_tokens == 24
    assert f"'{old}' is now '{new}'" in capsys.readouterr().err
    path = tmp_path / "r.yaml"
    path.write_text("data:\n  text_budget: 12\n")
    assert load_config(path, schema=TrainConfig).data.max_caption_tokens == 12
    assert "line 2" in capsys.readouterr().err


def test_configs_built_in_code_are_checked():
    with pytest.raises(ConfigError, match="PretrainConfig: 'records' = 0 must be >= 1"):
        PretrainConfig(records=0)
    with pytest.raises(ConfigError, match="coeffs"):
        PretrainConfig(coeffs=[1.0, 1.0])
    with pytest.raises(ConfigError, match="caption_grid"):
        validate(SelfPlayConfig(curation=CurationSection(caption_grid=[[0, 0.5]])))
