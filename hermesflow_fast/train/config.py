"""Typed training config: nested dataclasses as the schema, YAML recipes, dotted command-line overrides.

    cfg = load_config("configs/tiny.yaml", ["train.lr=1e-5", "data.strict=false", "model.init_from=/x"])

Order of precedence: the schema's defaults (the HermesFlow paper's values with the released code's bugs fixed, spec
§2.4/§6), then the YAML file, then the overrides, left to right. Every value is checked against its field's annotated
type: ``int``, ``float`` (``1e-5`` is a float even though YAML 1.1 reads it as a string), ``bool`` (true/false, 1/0,
yes/no, on/off), ``str``, ``X | None`` (``null``/``none``/``~`` → None), ``list[X]`` (YAML syntax on the command line:
``train.adam_betas=[0.9,0.95]``) and ``Literal[...]`` (the allowed values are listed in the error). Ranges (``ge``,
``gt``, ``le``, ``lt`` in a field's metadata) are checked after all overrides, and no float may be NaN or ±inf.
Every error is a ``ConfigError`` (a ValueError) naming where the value came from (file and line, or the override),
the dotted key, the value and what was expected; an unknown key also gets the closest valid one::

    unknown key 'train.learning_rate' in configs/tiny.yaml line 7; did you mean 'train.lr'?

``save_config`` writes the resolved config as YAML (optionally under a header comment); ``load_config`` of that file
gives back an equal config. Recipes may start with comments (the command that runs them).

    python -m pytest -q tests/train/test_config.py
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import operator
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from hermesflow_fast.errors import UserError
from hermesflow_fast.io import write_atomic

__all__ = [
    "CheckpointSection",
    "ConfigError",
    "DataSection",
    "DistSection",
    "LogSection",
    "ModelSection",
    "RunSection",
    "TrainConfig",
    "TrainSection",
    "config_keys",
    "config_to_dict",
    "load_config",
    "save_config",
]

T = TypeVar("T")


class ConfigError(UserError):
    """A config that cannot be used: the message names the file/line or override, the key and what was expected."""


def _field(default: Any, help: str, **bounds: float) -> Any:
    """A dataclass field with a help string and optional numeric bounds (ge, gt, le, lt), checked by load_config."""
    meta = {"help": help, **bounds}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


# ----------------------------------------------------------------------------------------------------------- schema


@dataclass
class RunSection:
    name: str = _field("run", "run name (used for the default run dir runs/<name>)")
    run_dir: str | None = _field(None, "output folder; None → runs/<name>")
    seed: int = _field(0, "global seed (each rank adds its rank)", ge=0)


@dataclass
class ModelSection:
    init_from: str | None = _field(None, "folder with weights in HF Phi, Show-o or our layout; None → random init")
    config: Literal["tiny", "show_o_512"] | None = _field(None, "named architecture when init_from has no config")
    vocab: str | None = _field(None, "vocabulary JSON (token layout); None → the one next to the weights")
    attn_backend: Literal["auto", "sdpa", "flex", "flash", "eager"] = _field("auto", "attention backend")
    dtype: Literal["auto", "fp32", "bf16"] = _field("auto", "compute dtype; auto → bf16 autocast on CUDA, fp32 on CPU")
    compile: bool | None = _field(None, "torch.compile the blocks; None → on for CUDA")
    activation_checkpointing: bool = _field(False, "recompute block activations in backward (saves memory)")


@dataclass
class DataSection:
    pairs: str | None = _field(None, "pairs file (JSONL, or HermesFlow's pair_dpo_data.json with format=hermesflow)")
    format: Literal["jsonl", "hermesflow"] = _field("jsonl", "format of the pairs file")
    image_root: str | None = _field(None, "folder image paths are relative to (HermesFlow: its repo root); "
                                          "None → the pairs file's folder")
    token_cache: str | None = _field(None, "token cache folder of the pairs' images (hermesflow tokenize)")
    image_tokenizer: str | None = _field(None, "image tokenizer folder (used when an image is not in the cache)")
    text_tokenizer: str | None = _field(None, "text tokenizer folder or file")
    strict: bool = _field(True, "refuse the run on any invalid pair instead of dropping and counting it")
    truncate: bool = _field(True, "truncate captions/prompts longer than the budget instead of refusing them")
    text_budget: int = _field(128, "max caption tokens (Show-o max_seq_length)", ge=1)
    t2i_text_len: int = _field(129, "text slots of a t2i sequence (Show-o max_text_len = 128 + 1)", ge=1)
    token_budget: int = _field(4096, "tokens per micro-batch (packed sequences)", ge=1)
    synthetic_pairs: int = _field(0, "> 0: make this many pairs of random captions, prompts and image codes (seeded "
                                     "by run.seed) instead of reading files: for smoke tests and benchmarks", ge=0)


@dataclass
class TrainSection:
    beta: float = _field(0.2, "DPO β (KL strength)", gt=0.0)
    loss_type: Literal[
        "sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "apo_zero", "apo_down",
        "discopop",
    ] = _field("sigmoid", "DPO loss (ops.dpo.DPO_LOSS_TYPES)")
    label_smoothing: float = _field(0.0, "ε for cDPO / robust / exo_pair", ge=0.0, lt=1.0)
    und_coeff: float = _field(1.0, "weight of the understanding (caption) DPO term", ge=0.0)
    gen_coeff: float = _field(1.0, "weight of the generation (image) DPO term", ge=0.0)
    batch_size: int = _field(4, "pairs per micro-step over all ranks (paper: 4); each rank's share runs in "
                                "micro-batches of <= data.token_budget tokens", ge=1)
    lr: float = _field(2e-5, "peak learning rate (AdamW)", gt=0.0)
    weight_decay: float = _field(0.01, "AdamW decoupled weight decay (not on biases, norms, embeddings)", ge=0.0)
    adam_betas: list[float] = _field([0.9, 0.999], "AdamW (β1, β2)")
    adam_eps: float = _field(1e-8, "AdamW ε", gt=0.0)
    warmup_steps: int = _field(0, "linear warm-up steps; 0 → warmup_ratio × total steps", ge=0)
    warmup_ratio: float = _field(0.1, "warm-up fraction of the actual total steps when warmup_steps == 0", ge=0.0,
                                 lt=1.0)
    max_steps: int | None = _field(None, "optimizer steps; None → epochs × steps per epoch of the data", ge=1)
    epochs: int = _field(1, "passes over the pairs when max_steps is None", ge=1)
    grad_accum: int = _field(1, "micro-steps of batch_size pairs per optimizer step: a step takes batch_size × "
                                "grad_accum pairs over all ranks, each pair weighing the same (accum 2 × batch B = "
                                "batch 2B)", ge=1)
    max_grad_norm: float | None = _field(1.0, "gradient clipping norm; None → no clipping", gt=0.0)
    precompute_ref_logps: bool = _field(False, "reference log-probs computed once before training (no ref model)")
    nan_policy: Literal["stop", "skip"] = _field("stop", "a non-finite loss/grad: stop the run, or skip the step")
    text_dropout: float = _field(0.0, "prompt-drop probability for t2i pairs: one draw per pair (never per side)",
                                 ge=0.0, le=1.0)
    rpo_alpha: float = _field(0.0, "α of RPO (TRL's rpo_alpha): α × the chosen sequence's NLL per token added to "
                                   "each side's loss, per pair (TRL adds α × the batch's mean NLL over all chosen "
                                   "tokens; here each pair's own per-token mean, averaged like the DPO term, so a "
                                   "step's loss does not depend on how its pairs are split); 0 → plain DPO",
                              ge=0.0)
    gen_masks: int = _field(1, "masks per generation pair: logπ of an image is the mean over its masks, each drawn "
                               "from (pair id, epoch, seed, mask index) and shared by policy, reference, chosen and "
                               "rejected; the masks ride as extra branches of the pair's one sequence (M × the "
                               "image tokens); 1 → Show-o's one draw", ge=1)
    gen_logp: Literal["sum", "mean"] = _field("sum", "per gen mask: the sum of the masked slots' log-probs (Show-o) or "
                                                     "their mean per masked slot (every mask weighs the same "
                                                     "whatever its size; rescales β's effect by ~1/k)")
    gen_mask_ratio: list[float] = _field([0.0, 1.0], "(min, max) of a gen mask's ratio: Show-o's cosine law "
                                                     "r = cos(πt/2) restricted to min ≤ r ≤ max; [0, 1] → unchanged")


@dataclass
class CheckpointSection:
    every: int = _field(100, "save every N optimizer steps (and at the end)", ge=1)
    keep: int = _field(3, "complete checkpoints kept (older ones deleted); 0 → keep all", ge=0)


@dataclass
class LogSection:
    every: int = _field(1, "log metrics every N optimizer steps", ge=1)
    tensorboard: bool = _field(False, "also log to TensorBoard (needs tensorboard)")
    wandb: bool = _field(False, "also log to Weights & Biases (needs wandb)")
    progress: bool = _field(True, "progress bar on rank 0 when stdout is a terminal")


@dataclass
class DistSection:
    strategy: Literal["ddp", "fsdp"] = _field("ddp", "data parallelism: DDP, or FSDP2 (fully_shard)")
    backend: Literal["auto", "gloo", "nccl"] = _field("auto", "process-group backend; auto → nccl on CUDA, else gloo")


@dataclass
class TrainConfig:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)
    dist: DistSection = field(default_factory=DistSection)


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


def config_keys(schema: type | None = None) -> list[str]:
    """Every dotted key of ``schema`` (default TrainConfig): sections and leaves, in schema order."""
    schema = TrainConfig if schema is None else schema
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
    key = key.strip().removeprefix("--")
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


def _check_bounds(obj: Any, prefix: str, origins: dict[str, str]) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = prefix + f.name
        if dataclasses.is_dataclass(value):
            _check_bounds(value, key + ".", origins)
            continue
        numbers = value if isinstance(value, list) else [value]
        for x in numbers:
            if isinstance(x, float) and not math.isfinite(x):
                where = origins.get(key, "the schema default")
                raise ConfigError(f"{where}: '{key}' = {value!r} must be a finite number")
        if value is None or isinstance(value, (bool, str, list)):
            continue
        for bound, ok, word in (("ge", operator.ge, ">="), ("gt", operator.gt, ">"), ("le", operator.le, "<="),
                                ("lt", operator.lt, "<")):
            if bound in f.metadata and not ok(value, f.metadata[bound]):
                where = origins.get(key, "the schema default")
                raise ConfigError(f"{where}: '{key}' = {value!r} must be {word} {f.metadata[bound]}")


def _check_extra(cfg: Any, origins: dict[str, str]) -> None:
    """Cross-field rules of TrainConfig that a single field's type cannot say."""
    train = getattr(cfg, "train", None)
    if isinstance(train, TrainSection):
        betas = train.adam_betas
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ConfigError(f"{origins.get('train.adam_betas', 'the schema default')}: 'train.adam_betas' = {betas}"
                              f" must be two numbers in [0, 1)")
        ratio = train.gen_mask_ratio
        if len(ratio) != 2 or not (0.0 <= ratio[0] <= ratio[1] <= 1.0 and ratio[1] > 0.0):
            raise ConfigError(f"{origins.get('train.gen_mask_ratio', 'the schema default')}: 'train.gen_mask_ratio' = "
                              f"{ratio} must be [min, max] with 0 <= min <= max <= 1 and max > 0")


def load_config(
    path: str | Path | None, overrides: list[str] | tuple[str, ...] = (), schema: type[T] = TrainConfig
) -> T:
    """The schema's defaults, then the YAML file at ``path`` (if any), then ``overrides`` (``dotted.key=value``).

    ``schema``: a dataclass whose fields are scalars (types above) or nested dataclasses, every field with a default;
    defined at module level (its annotations are resolved with ``typing.get_type_hints``)."""
    cfg = schema()
    origins: dict[str, str] = {}
    if path is not None:
        path = Path(path)
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
        origins[override.split("=", 1)[0].strip().removeprefix("--")] = f"override {override!r}"
    _check_bounds(cfg, "", origins)
    _check_extra(cfg, origins)
    return cfg


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
