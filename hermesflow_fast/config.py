"""One config system for every job: typed dataclass schemas, YAML recipes, dotted command-line overrides.

    cfg = load_config("configs/tiny.yaml", ["train.lr=1e-5", "data.strict=false"], schema=TrainConfig)
    cfg = load_config("selfplay-shapes", [], schema=SelfPlayConfig)     # a recipe shipped in the package

A schema is a dataclass of sections (dataclasses) and knobs. Every knob is declared once, with its one default, help
and bounds, by ``knob``: train/config.py (``TrainConfig``), selfplay/config.py (``SelfPlayConfig``), world/config.py
(``WorldSection``, ``EvalSection``, ``PretrainConfig``). Functions take a section, never a knob with a default of its
own; command-line options are made from the schema (``knob_options``) and default to it.

Order of precedence: the schema's defaults (the HermesFlow paper's values with the released code's bugs fixed,
docs/differences.md), then the YAML file, then the overrides, left to right. Every value is checked against its
field's annotated type: ``int``, ``float`` (``1e-5`` is a float even though YAML 1.1 reads it as a string), ``bool``
(true/false, 1/0, yes/no, on/off), ``str``, ``X | None`` (``null``/``none``/``~`` → None), ``list[X]`` (YAML syntax on
the command line: ``train.adam_betas=[0.9,0.95]``) and ``Literal[...]`` (the allowed values are listed in the error).
Ranges (``ge``, ``gt``, ``le``, ``lt`` in a knob's metadata) are checked after all overrides, then each section's
``check`` (cross-field rules), and no float may be NaN or ±inf. Every error is a ``ConfigError`` (a ValueError)
naming where the value came from (file and line, or the override), the dotted key, the value and what was expected;
an unknown key also gets the closest valid one::

    unknown key 'train.learning_rate' in configs/tiny.yaml line 7; did you mean 'train.lr'?

A renamed key (``RENAMED_KEYS``) is still read, with a warning naming its new name. ``save_config`` writes the
resolved config as YAML (optionally under a header comment); ``load_config`` of that file gives back an equal config.
Recipes may start with comments (the command that runs them).

    python -m pytest -q tests/test_config_system.py tests/train/test_config.py
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import operator
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from hermesflow_fast.errors import UserError
from hermesflow_fast.io import write_atomic

__all__ = [
    "RECIPES_DIR",
    "RENAMED_KEYS",
    "ConfigError",
    "config_keys",
    "config_to_dict",
    "knob",
    "knob_default",
    "knob_options",
    "load_config",
    "options_to_overrides",
    "recipe_path",
    "save_config",
    "validate",
]

T = TypeVar("T")

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"  # the shipped YAML recipes (configs/ points here)

# Old dotted key → its new name; the old one is still read (YAML or override) and a warning names the new one.
RENAMED_KEYS = {"data.text_budget": "data.max_caption_tokens"}


class ConfigError(UserError):
    """A config that cannot be used: the message names the file/line or override, the key and what was expected."""


def knob(default: Any, help: str, **bounds: float) -> Any:
    """A schema field: its one default, a help string and optional numeric bounds (ge, gt, le, lt), checked by
    ``load_config`` / ``validate``."""
    meta = {"help": help, **bounds}
    if isinstance(default, list):
        return field(default_factory=lambda: [list(x) if isinstance(x, list) else x for x in default], metadata=meta)
    return field(default=default, metadata=meta)


def recipe_path(name: str | Path) -> Path:
    """``name`` as a file if it is one, else the shipped recipe ``RECIPES_DIR/<name>[.yaml]``; ConfigError otherwise,
    listing the shipped recipes."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = RECIPES_DIR / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
    if len(path.parts) == 1 and shipped.is_file():
        return shipped
    if path.exists():
        raise ConfigError(f"config file {path}: not a file")
    names = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
    raise ConfigError(f"config file {path}: cannot read it (no such file, and not a shipped recipe: {names})")


def _renamed(key: str, schema: type, where: str | None) -> str:
    """``key``'s new name when it was renamed (``RENAMED_KEYS``) and the new one is in ``schema``, else ``key``;
    ``where`` (the file and line or override): say so on stderr."""
    new = RENAMED_KEYS.get(key)
    if new is None:
        return key
    try:
        _lookup(schema, new)
    except KeyError:
        return key
    if where is not None:
        print(f"warning: {where}: '{key}' is now '{new}' (read as '{new}')", file=sys.stderr)
    return new


# ------------------------------------------------------------------------------------------------------ type system


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp: Any) -> str:
    """What a value of annotated type ``tp`` must be, in words: 'a float', "one of 'a', 'b'", 'a string or null'."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is list:
        return f"a list of {_type_name(args[0]).removeprefix('a ').removeprefix('an ')}s" if args else "a list"
    return {bool: "a bool (true/false)", int: "an int", float: "a float", str: "a string"}.get(tp, str(tp))


_TRUE, _FALSE = {"true", "1", "yes", "y", "on"}, {"false", "0", "no", "n", "off"}
_NONE = {"null", "none", "~", ""}


class _Mismatch(Exception):
    """Raised by _coerce; the caller turns it into a ConfigError naming the source and key."""


def _coerce(value: Any, tp: Any, from_text: bool) -> Any:
    """``value`` as a value of annotated type ``tp``; ``from_text``: value is a raw command-line string."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if type(None) in args and (value is None or (from_text and value.strip().lower() in _NONE)):
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, from_text)
            except _Mismatch:
                continue
        raise _Mismatch
    if value is None:
        raise _Mismatch
    if origin is Literal:
        if value in args and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            for arg in args:
                if not isinstance(arg, str) and str(arg) == value.strip():
                    return arg
        raise _Mismatch
    if origin is list:
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError as exc:
                raise _Mismatch from exc
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        return [_coerce(v, args[0], False) if args else v for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise _Mismatch
    if tp is int:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            text = value.strip()
            try:
                return int(text)
            except ValueError:
                pass
            try:
                as_float = float(text)  # "1e3"
            except ValueError as exc:
                raise _Mismatch from exc
            if as_float.is_integer():
                return int(as_float)
        raise _Mismatch
    if tp is float:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError as exc:
                raise _Mismatch from exc
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    raise TypeError(f"config schema: unsupported field type {tp!r}")


# ------------------------------------------------------------------------------------------------------- key lookup

# Names other trainers use (HF Trainer, TRL, torchtune, Show-o's YAML) → our leaf name (looked up in the same section,
# then anywhere) or our full dotted key; only used to suggest a key.
_ALIASES = {
    "learning_rate": "lr",
    "gradient_accumulation_steps": "grad_accum",
    "num_train_epochs": "epochs",
    "max_train_steps": "max_steps",
    "num_warmup_steps": "warmup_steps",
    "lr_warmup_steps": "warmup_steps",
    "clip_grad_norm": "max_grad_norm",
    "adam_epsilon": "adam_eps",
    "precompute_ref_log_probs": "precompute_ref_logps",
    "t2i_coeff": "gen_coeff",
    "mmu_coeff": "und_coeff",
    "cond_dropout_prob": "text_dropout",
    "save_steps": "checkpoint.every",
    "save_every": "checkpoint.every",
    "checkpointing_steps": "checkpoint.every",
    "save_total_limit": "checkpoint.keep",
    "keep_latest_k": "checkpoint.keep",
    "logging_steps": "log.every",
    "output_dir": "run.run_dir",
    "gradient_checkpointing": "activation_checkpointing",
    "mixed_precision": "dtype",
}


def config_keys(schema: type) -> list[str]:
    """Every dotted key of ``schema``: sections and leaves, in schema order."""
    keys: list[str] = []

    def walk(cls: type, prefix: str) -> None:
        for name, tp in _hints(cls).items():
            keys.append(prefix + name)
            if _is_section(tp):
                walk(tp, prefix + name + ".")

    walk(schema, "")
    return keys


def _suggest(key: str, schema: type) -> str:
    keys = config_keys(schema)
    leaves = {k.rsplit(".", 1)[-1]: k for k in keys}
    prefix, _, leaf = key.rpartition(".")
    alias = _ALIASES.get(leaf.lower())
    if alias is not None:
        for candidate in (alias, f"{prefix}.{alias}" if prefix else alias, leaves.get(alias)):
            if candidate in keys:
                return f"; did you mean '{candidate}'?"
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if not close:
        same_section = [k for k in keys if k.rpartition(".")[0] == prefix]
        close = difflib.get_close_matches(key, same_section, n=1, cutoff=0.5)
    if not close:
        near_leaf = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.75)
        close = [leaves[near_leaf[0]]] if near_leaf else []
    return f"; did you mean '{close[0]}'?" if close else ""


def _lookup(schema: type, key: str) -> tuple[type, str, Any]:
    """(section class, field name, annotated type) of dotted ``key``; KeyError if the key does not exist."""
    cls = schema
    parts = key.split(".")
    for part in parts[:-1]:
        tp = _hints(cls).get(part)
        if not _is_section(tp):
            raise KeyError(key)
        cls = tp
    hints = _hints(cls)
    if parts[-1] not in hints:
        raise KeyError(key)
    return cls, parts[-1], hints[parts[-1]]


# ---------------------------------------------------------------------------------------------------------- loading


def _line_of(node: yaml.Node | None) -> str:
    return f" line {node.start_mark.line + 1}" if node is not None else ""


def _key_nodes(node: yaml.Node, prefix: str, out: dict[str, tuple[yaml.Node, yaml.Node]], source: str) -> None:
    """Dotted key → (key node, value node) of a composed YAML mapping, for line numbers."""
    if not isinstance(node, yaml.MappingNode):
        return
    for key_node, value_node in node.value:
        dotted = f"{prefix}{key_node.value}"
        if dotted in out:
            first = _line_of(out[dotted][0])
            raise ConfigError(f"{source}{_line_of(key_node)}: key '{dotted}' is given twice (first at{first})")
        out[dotted] = (key_node, value_node)
        _key_nodes(value_node, dotted + ".", out, source)


def _apply_mapping(obj: Any, data: Any, prefix: str, source: str, nodes: dict, schema: type) -> None:
    """Set the fields of dataclass instance ``obj`` from the YAML mapping ``data`` (checked against the schema)."""
    section = prefix.rstrip(".") or "the top level"
    if not isinstance(data, dict):
        node = nodes.get(prefix.rstrip("."), (None, None))[1]
        raise ConfigError(f"{source}{_line_of(node)}: '{section}' must be a mapping of keys, got {data!r}")
    hints = _hints(type(obj))
    for raw_key, value in data.items():
        key = f"{prefix}{raw_key}"
        key_node = nodes.get(key, (None, None))[0]
        if isinstance(raw_key, str):  # a renamed key is read under its new name (a key of the same section)
            key = _renamed(key, schema, f"{source}{_line_of(key_node)}")
            raw_key = key.rpartition(".")[2]
        if not isinstance(raw_key, str) or raw_key not in hints:
            raise ConfigError(f"unknown key '{key}' in {source}{_line_of(key_node)}{_suggest(key, schema)}")
        tp = hints[raw_key]
        if _is_section(tp):
            _apply_mapping(getattr(obj, raw_key), value, key + ".", source, nodes, schema)
            continue
        try:
            setattr(obj, raw_key, _coerce(value, tp, from_text=False))
        except _Mismatch:
            raise ConfigError(
                f"{source}{_line_of(key_node)}: '{key}' = {value!r}: expected {_type_name(tp)}"
            ) from None


def _apply_override(cfg: Any, override: str, schema: type) -> None:
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected key=value, e.g. train.lr=1e-5")
    key, text = override.split("=", 1)
    key = _renamed(key.strip().removeprefix("--"), schema, f"override {override!r}")
    try:
        cls, name, tp = _lookup(schema, key)
    except KeyError:
        raise ConfigError(f"unknown key '{key}' in override {override!r}{_suggest(key, schema)}") from None
    if _is_section(tp):
        raise ConfigError(f"override {override!r}: '{key}' is a section; set one of its keys, e.g. '{key}.…=value'")
    try:
        value = _coerce(text, tp, from_text=True)
    except _Mismatch:
        raise ConfigError(f"override {override!r}: '{key}' = {text!r}: expected {_type_name(tp)}") from None
    target = cfg
    for part in key.split(".")[:-1]:
        target = getattr(target, part)
    setattr(target, name, value)


def _check_bounds(obj: Any, prefix: str, where: Callable[[str], str]) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = prefix + f.name
        if dataclasses.is_dataclass(value):
            _check_bounds(value, key + ".", where)
            continue
        numbers = value if isinstance(value, list) else [value]
        for x in numbers:
            if isinstance(x, float) and not math.isfinite(x):
                raise ConfigError(f"{where(key)}: '{key}' = {value!r} must be a finite number")
        if value is None or isinstance(value, (bool, str, list)):
            continue
        for bound, ok, word in (("ge", operator.ge, ">="), ("gt", operator.gt, ">"), ("le", operator.le, "<="),
                                ("lt", operator.lt, "<")):
            if bound in f.metadata and not ok(value, f.metadata[bound]):
                raise ConfigError(f"{where(key)}: '{key}' = {value!r} must be {word} {f.metadata[bound]}")


def _check_sections(obj: Any, prefix: str, where: Callable[[str], str]) -> None:
    """Cross-field rules a single field's type cannot say: a section may define ``check(where)``, raising
    ConfigError; ``where(key)`` names where the leaf ``key`` of that section was set."""
    check = getattr(obj, "check", None)
    if callable(check):
        check(lambda key: where(prefix + key))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_sections(value, prefix + f.name + ".", where)


def validate(cfg: Any, origins: dict[str, str] | None = None, default_origin: str = "the schema default") -> Any:
    """Check a config built in code as ``load_config`` checks a loaded one (bounds, finite floats, each section's
    ``check``); returns it. ConfigError names the key and where it was set (``origins``: dotted key → source; any
    other key: ``default_origin``)."""
    known = origins or {}

    def where(key: str) -> str:
        return known.get(key, default_origin)

    _check_bounds(cfg, "", where)
    _check_sections(cfg, "", where)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (), *, schema: type[T]) -> T:
    """The schema's defaults, then the YAML file at ``path`` (if any: a file, or the name of a shipped recipe,
    ``recipe_path``), then ``overrides`` (``dotted.key=value``).

    ``schema``: a dataclass whose fields are scalars (types above) or nested dataclasses, every field with a default
    (``knob``); defined at module level (its annotations are resolved with ``typing.get_type_hints``)."""
    cfg = schema()
    origins: dict[str, str] = {}
    if path is not None:
        path = recipe_path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"config file {path}: cannot read it ({exc.strerror or exc})") from exc
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path}: not valid YAML ({exc})") from exc
        nodes: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        if root is not None:
            _key_nodes(root, "", nodes, str(path))
        if data is not None:
            _apply_mapping(cfg, data, "", str(path), nodes, schema)
        for key, (key_node, _) in nodes.items():
            origins[key] = f"{path}{_line_of(key_node)}"
    for override in overrides:
        _apply_override(cfg, override, schema)
        key = _renamed(override.split("=", 1)[0].strip().removeprefix("--"), schema, None)
        origins[key] = f"override {override!r}"
    return validate(cfg, origins)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A config as nested plain dicts/lists/scalars (YAML/JSON-able), in schema order."""
    if not dataclasses.is_dataclass(cfg):
        raise TypeError(f"config_to_dict: expected a config dataclass instance, got {type(cfg).__name__}")
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = config_to_dict(value)
        elif isinstance(value, (list, tuple)):
            out[f.name] = list(value)
        else:
            out[f.name] = value
    return out


class _Dumper(yaml.SafeDumper):
    """Block-style sections, flow-style lists (``adam_betas: [0.9, 0.999]``)."""


_Dumper.add_representer(list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data,
                                                                             flow_style=True))


def save_config(cfg: Any, path: str | Path, header: str | None = None) -> Path:
    """Write ``cfg`` as YAML (``header`` lines as ``# `` comments first); ``load_config(path)`` gives ``cfg`` back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# {line}".rstrip() for line in header.splitlines()] if header else []
    body = yaml.dump(config_to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120)
    return write_atomic(path, "\n".join(lines) + ("\n" if lines else "") + body)


# ------------------------------------------------------------------------------------------------ command-line options


def knob_default(schema: type, key: str) -> Any:
    """The default of dotted ``key`` in ``schema`` (its one definition)."""
    obj = schema()
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _click_type(tp: Any) -> Any:
    import click

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _click_type(inner[0]) if len(inner) == 1 else str
    if origin is Literal:
        return click.Choice([str(a) for a in args])
    return {bool: click.BOOL, int: int, float: float, str: str}.get(tp, str)


def knob_options(schema: type, options: dict[str, str], defaults_from: str | None = None) -> Callable:
    """A decorator adding one click option per ``{"--flag": "dotted.key"}`` of ``schema``: type and help from the
    knob, default None (the command passes what was given as overrides, ``options_to_overrides``), and the default
    shown is the knob's, or the value in the recipe ``defaults_from`` when that recipe sets it."""
    import click

    shown = load_config(defaults_from, schema=schema) if defaults_from else schema()

    def decorate(fn: Callable) -> Callable:
        for flag, key in reversed(list(options.items())):
            cls, name, tp = _lookup(schema, key)
            meta = next(f.metadata for f in dataclasses.fields(cls) if f.name == name)
            value = shown
            for part in key.split("."):
                value = getattr(value, part)
            where = f"{defaults_from}: " if defaults_from else ""
            fn = click.option(flag, key.replace(".", "__"), type=_click_type(tp), default=None,
                              help=f"{key}: {meta['help']}  [default: {where}{value}]")(fn)
        return fn

    return decorate


def options_to_overrides(options: dict[str, str], given: dict[str, Any]) -> list[str]:
    """The dotted overrides of the ``knob_options`` given on the command line (None = not given)."""
    out = []
    for key in options.values():
        value = given.get(key.replace(".", "__"))
        if value is not None:
            out.append(f"{key}={value}")
    return out
