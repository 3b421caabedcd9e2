"""Run configuration: YAML in, validated frozen dataclasses out.

    cfg = load("configs/demo.yaml", ["train.epochs=2", "method.max_rounds=3"])
    cfg.train.lr, cfg.method.acc_budget

Every key is checked when a config is read: an unknown key names itself and
the closest valid key; a wrong type names the key and the type expected; a
value outside the key's range names the range. Each key declares its range
once, beside its default (`option(default, ge=..., choices=...)`, kept in the
field's metadata as a `Range`). Rules that tie several keys together are each
section's `check(cfg)` (a method's in its package `__init__`, with its options).
The `method:` section's keys besides `name` belong to the method and are
validated by its registered dataclass (`jaxprune.methods.register`).

What needs more than the config (the machine, the data set, the model, files
on disk) is checked by `jaxprune.preflight`, before a run reads data or makes
its folder.
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
from jaxprune.merging import COST_MODELS


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a config key accepts besides its type: bounds (`ge` >=, `gt` >, `le` <=),
    `choices`, or a `pattern` (a regex, described by `pattern_doc`). For a list the range
    holds for every item; null (where the type allows it) is always accepted. `why` is
    appended to the error: what the value is for, or how to fix it."""
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    choices: tuple | None = None
    pattern: str | None = None
    pattern_doc: str = ""
    why: str = ""

    def describe(self) -> str:
        """The range as a person reads it: ">= 1", "in [0, 1]", "> 0", "one of ('a', 'b')"."""
        if self.choices is not None:
            return f"one of {tuple(self.choices)}"
        if self.pattern is not None:
            return self.pattern_doc
        low = (f"[{self.ge:g}" if self.ge is not None else
               f"({self.gt:g}" if self.gt is not None else None)
        if low is not None and self.le is not None:
            return f"in {low}, {self.le:g}]"
        if self.ge is not None:
            return f">= {self.ge:g}"
        if self.gt is not None:
            return f"> {self.gt:g}"
        return f"<= {self.le:g}"

    def accepts(self, value) -> bool:
        if self.choices is not None:
            return value in self.choices
        if self.pattern is not None:
            return isinstance(value, str) and re.fullmatch(self.pattern, value) is not None
        return not ((self.ge is not None and value < self.ge)
                    or (self.gt is not None and value <= self.gt)
                    or (self.le is not None and value > self.le))

    def check(self, key: str, value) -> None:
        """A UserError naming `key`, the range and the value when `value` is outside it."""
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            if item is not None and not self.accepts(item):
                where = f"{key}[{i}]" if isinstance(value, list) else key
                raise UserError(f"config key '{where}' must be {self.describe()}, got {item!r}"
                                + (f": {self.why}" if self.why else ""))


def option(default=dataclasses.MISSING, *, default_factory=dataclasses.MISSING, **range_args):
    """A config key: its default and its `Range` (see there), in the field's metadata."""
    meta = {"range": Range(**range_args)} if range_args else {}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=meta)


# A weights reference (model.pretrained, parity's method.source) naming torchvision's weights,
# "torchvision:<WEIGHTS>", rather than a file.
TORCHVISION = "torchvision:"


def is_file_reference(ref: str | None) -> bool:
    """Whether a weights reference names a file or folder (rather than torchvision's)."""
    return bool(ref) and not ref.startswith(TORCHVISION)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: str = "resnet18_cifar"
    num_classes: int | None = option(None, ge=1, why="null: the data set's class count")
    pretrained: str | None = None   # .pth/.pt/.safetensors path, or "torchvision:<WEIGHTS>"
    options: dict = dataclasses.field(default_factory=dict)  # models.create(**options), e.g. width
    source: str | None = None       # a torch.export program (.pt2); name becomes "torch:<source>"


@dataclasses.dataclass(frozen=True)
class DataConfig:
    name: str = "digits"
    root: str | None = None          # where the data set lives (not needed when built in)
    batch_size: int = option(128, ge=1)  # global batch, split over devices and processes
    eval_batch_size: int | None = option(None, ge=1)  # None: batch_size
    image_size: int | None = option(None, ge=8)  # None: the data set's native size
    num_workers: int | None = option(None, ge=0)  # None: chosen from the machine's cores
    mixup: float = option(0.0, ge=0, why="the Beta(a, a) parameter; 0: off")
    cutmix: float = option(0.0, ge=0, why="the Beta(a, a) parameter; 0: off")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    epochs: int = option(160, ge=1)
    optimizer: str = option("sgd", choices=("sgd", "adam"))
    lr: float = option(0.1, gt=0)
    momentum: float = option(0.9, ge=0, le=1)
    nesterov: bool = False
    weight_decay: float = option(1e-4, ge=0)
    schedule: str = option("step", choices=("step", "cosine", "constant"))
    milestones: list[int] = option(default_factory=lambda: [80, 120], ge=1,
                                   why="the epochs (from 1) at which the step schedule decays")
    gamma: float = option(0.1, gt=0, le=1, why="the step schedule's decay factor")
    label_smoothing: float = option(0.0, ge=0, le=1)
    grad_clip: float | None = option(None, gt=0, why="the largest global gradient norm; "
                                                     "null: no clipping")
    min_lr: float = option(0.0, ge=0)  # where the cosine schedule ends
    weight_decay_1d: bool = True     # false: no decay on biases and other 1-D parameters (timm's rule)

    def check(self, cfg: "Config") -> None:
        if self.schedule == "cosine" and self.min_lr > self.lr:
            raise UserError(f"train.min_lr ({self.min_lr:g}) must be at most train.lr "
                            f"({self.lr:g}): the cosine schedule decays from lr to min_lr")


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """Base of every method's options; subclasses add their keys (each an `option`) and
    override the hooks below. The hooks import no training code: a dry run calls them."""
    name: str = "easier"
    # False for a method that reads no data set (`parity`): the data checks are skipped.
    reads_data: typing.ClassVar[bool] = True

    def check(self, cfg: "Config") -> None:
        """Rules between this method's keys, or with other sections' keys: a UserError."""

    def inputs(self) -> dict[str, str]:
        """Files or folders this method reads ({config key: path}); each must exist."""
        return {}

    def check_model(self, cfg: "Config", m) -> None:
        """What this method needs of the model (`m`: its graph, weights possibly
        abstract): a UserError when the model does not have it."""

    def input_sizes(self, cfg: "Config", native: tuple[int, int]) -> list | None:
        """The (H, W) sizes this method feeds the model; None: the data's image size."""
        return None


@dataclasses.dataclass(frozen=True)
class FuseConfig(MethodConfig):
    """Options of a method that ends by fusing its model (`jaxprune/methods/fuse_export.py`)."""
    # jaxprune.merge's cost model: macs | latency | none (fuse all)
    merge_cost: str = option("macs", choices=COST_MODELS)
    latency: bool = True      # time the dense and the fused model (jaxprune.measure; ~1 min)


@dataclasses.dataclass(frozen=True)
class Config:
    # one folder under `out`: no separators, no '.'/'..', nothing hidden
    name: str = option("run", pattern=r"[A-Za-z0-9_-][A-Za-z0-9._-]*",
                       pattern_doc="a plain folder name (letters, digits, '-', '_', '.')",
                       why="the run folder is <out>/<name>; put folders in 'out'")
    seed: int = option(0, ge=0)
    out: str = "runs"                # run folders are created as <out>/<name>
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    method: MethodConfig = dataclasses.field(default_factory=MethodConfig)


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
            if "range" in f.metadata:
                f.metadata["range"].check(key, values[name])
    return cls(**values)


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
    cfg = _name_source(cfg, raw.get("model") or {})
    method_name = method_raw.get("name", MethodConfig.name)
    if not isinstance(method_name, str):
        raise UserError(f"config key 'method.name' must be str, got {method_name!r}")
    method_cls = methods.get(method_name).config
    cfg = dataclasses.replace(cfg, method=_build(method_cls, method_raw, "method"))
    for section in (cfg.train, cfg.method):  # the rules between keys, once every key is valid
        section.check(cfg)
    return cfg


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
