"""Run configuration: YAML in, validated frozen dataclasses out.

    cfg = load("configs/demo.yaml", ["train.epochs=2", "method.max_rounds=3"])
    cfg.train.lr, cfg.method.acc_budget

Every key is checked: an unknown key names itself and the closest valid key; a
wrong type names the key and the type expected. The `method:` section's keys
besides `name` belong to the method and are validated by its registered
dataclass (`jaxprune.methods.register(..., config=...)`).
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from jaxprune.errors import UserError, closest


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: str = "resnet18_cifar"
    num_classes: int | None = None  # None: the data set's class count
    pretrained: str | None = None   # .pth/.pt/.safetensors path, or "torchvision:<WEIGHTS>"
    options: dict = dataclasses.field(default_factory=dict)  # models.create(**options), e.g. width
    source: str | None = None       # a torch.export program (.pt2); name becomes "torch:<source>"


@dataclasses.dataclass(frozen=True)
class DataConfig:
    name: str = "digits"
    root: str | None = None          # where the data set lives (not needed for digits)
    batch_size: int = 128            # global batch, split over devices and processes
    eval_batch_size: int | None = None  # None: batch_size
    image_size: int | None = None    # None: the data set's native size
    num_workers: int | None = None   # None: chosen from the machine's cores
    mixup: float = 0.0
    cutmix: float = 0.0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    epochs: int = 160
    optimizer: str = "sgd"           # sgd | adam
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    schedule: str = "step"           # step | cosine | constant
    milestones: list[int] = dataclasses.field(default_factory=lambda: [80, 120])
    gamma: float = 0.1               # step decay factor at each milestone
    label_smoothing: float = 0.0
    grad_clip: float | None = None   # global gradient-norm clip
    min_lr: float = 0.0              # where the cosine schedule ends
    weight_decay_1d: bool = True     # false: no decay on biases and other 1-D parameters (timm's rule)


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """Base of every method's options; subclasses add their keys."""
    name: str = "easier"


@dataclasses.dataclass(frozen=True)
class Config:
    name: str = "run"
    seed: int = 0
    out: str = "runs"                # run folders are created as <out>/<name>
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    method: MethodConfig = dataclasses.field(default_factory=MethodConfig)


CHOICES = {
    "train.optimizer": ("sgd", "adam"),
    "train.schedule": ("step", "cosine", "constant"),
}


def _type_name(tp) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, key: str):
    """`value` as type `tp`, or a UserError naming the key and the expected type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except UserError:
                continue
    elif tp is type(None):
        if value is None:
            return None
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is bool or tp is str:
        if isinstance(value, tp):
            return value
    elif origin is list:
        if isinstance(value, (list, tuple)):
            (item,) = typing.get_args(tp)
            return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    elif tp is dict:
        if isinstance(value, dict):
            return dict(value)
    raise UserError(f"config key '{key}' must be {_type_name(tp)}, got {value!r} "
                    f"({type(value).__name__})")


def _build(cls, raw: Any, prefix: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"config key '{prefix}' must be a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            dotted = [f"{prefix}.{f}" if prefix else f for f in fields]
            where = f"{prefix}.{key}" if prefix else str(key)
            raise UserError(f"unknown config key '{where}'; {closest(where, dotted)}")
    values = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            values[name] = _build(tp, raw[name], key)
        else:
            values[name] = _coerce(raw[name], tp, key)
            if key in CHOICES and values[name] not in CHOICES[key]:
                raise UserError(f"config key '{key}' must be one of {CHOICES[key]}, "
                                f"got {values[name]!r}")
    return cls(**values)


# A run name is one folder under `out`: no separators, no '.'/'..', nothing hidden.
_RUN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


def _check_run_name(name: str) -> None:
    """A UserError unless `name` is a plain folder name: `<out>/<name>` stays inside `out`."""
    if not _RUN_NAME.fullmatch(name):
        raise UserError(f"config key 'name' must be a plain folder name (letters, digits, '-', "
                        f"'_', '.'), got {name!r}: the run folder is <out>/<name>; "
                        f"put folders in 'out'")


def _name_source(cfg: Config, raw_model: dict) -> Config:
    """A model read from `model.source` is named `torch:<source>` (results and reports say
    which file it was); a different `model.name` beside it is refused."""
    source = cfg.model.source
    if source is None:
        return cfg
    name = f"torch:{source}"
    if "name" in raw_model and raw_model["name"] != name:
        raise UserError(f"config keys 'model.name' ({raw_model['name']!r}) and 'model.source' "
                        f"({source!r}) both name a model: remove model.name")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name=name))


def from_dict(raw: dict) -> Config:
    """Validate a plain dict (as read from YAML) into a `Config`."""
    from jaxprune import methods
    raw = dict(raw or {})
    method_raw = raw.pop("method", None) or {}
    if not isinstance(method_raw, dict):
        raise UserError(f"config key 'method' must be a mapping, got {method_raw!r}")
    cfg = _build(Config, raw, "")
    _check_run_name(cfg.name)
    cfg = _name_source(cfg, raw.get("model") or {})
    method_name = method_raw.get("name", MethodConfig.name)
    if not isinstance(method_name, str):
        raise UserError(f"config key 'method.name' must be str, got {method_name!r}")
    method_cls = methods.get(method_name).config
    return dataclasses.replace(cfg, method=_build(method_cls, method_raw, "method"))


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = raw
    for p in parents:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[last] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'train.lr=0.01' -> ('train.lr', 0.01); the value is read as YAML."""
    if "=" not in text:
        raise UserError(f"--set expects key=value (e.g. train.epochs=2), got {text!r}")
    key, value = text.split("=", 1)
    if not value.strip():
        return key.strip(), None
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise UserError(f"--set {text}: the value is not valid YAML "
                        f"({' '.join(str(e).split())}); quote strings with spaces or brackets") from None


def load(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (safe loader), apply `key=value` overrides, validate."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.constructor.ConstructorError as e:  # a tag asking to build an object: never built
            raise UserError(f"{path} holds a YAML tag that would build a Python object "
                            f"({' '.join(str(e).split())}); configs are plain data (numbers, "
                            f"strings, lists, mappings) and are read with yaml.safe_load: "
                            f"remove the tag") from None
        except yaml.YAMLError as e:
            raise UserError(f"{path} is not valid YAML: {e}".replace("\n", " ")) from None
        if not isinstance(raw, dict):
            raise UserError(f"{path} must hold a mapping of config keys at the top level")
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(raw, key, value)
    return from_dict(raw)


def to_dict(cfg) -> dict:
    """The resolved config as plain data (for YAML/JSON dumps and comparisons)."""
    return dataclasses.asdict(cfg)


def dump(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
