"""Any PyTorch image classifier as a jaxprune `Net`, through its graph.

    m = converters.trace(module, input_size=(224, 224))   # what from_torch(module) does
    m = converters.from_program(torch.export.export(module, (x,)))  # an exported program

`torch.export.export(module.eval(), (x,)).run_decompositions({})` gives the
functional ATen graph of the eval-mode forward pass: every op node names the
torch module that called it (`nn_module_stack`), parameters and buffers are
inputs named by their state-dict keys (`graph_signature`), and every tensor has
a known shape. Each op becomes one layer of the vocabulary (`models/layers`),
or nothing when it only moves data around (`OPS` below lists them all):

* a layer with parameters is named after them: the conv whose weight is
  `layer1.0.conv1.weight` is the layer `layer1.0.conv1`, so the module's state
  dict loads as it is;
* every other layer is named after the module call that made it: the module's
  path when its call made this one layer (`layer1.0.relu`, numbered `relu1`,
  `relu2` when the module runs twice, as torchvision's ResNet calls its ReLU),
  else `<path>.<op>` (`layer1.0.add`, `se.sigmoid`), numbered per module when
  it occurs more than once. Activations become sites, in forward order.

Layouts: torch's NCHW maps are NHWC here. Each tensor of the graph carries
the permutation between its torch dims and its jaxprune axes, so permutes cost
nothing (ConvNeXt's channels-last blocks and LayerNorm2d are plain per-pixel
`Linear` and `LayerNorm` layers) and every op checks it reads its axes where
the layer expects them. A global average pool followed by a flatten is one
`GlobalAvgPool`.

The graph is the eval-mode graph: dropout and stochastic depth are not in it
(they are identities there), so a traced model trains without them. Whatever
cannot be mapped is refused in one line (`UserError`) naming the op, its graph
node, the module and what is supported.
"""
from __future__ import annotations

import dataclasses
import math
from collections import defaultdict

import torch

from jaxprune.errors import UserError
from models.layers import ACTIVATIONS
from models.net import INPUT, Net

from converters.torch_arch import FORMAT, VERSION, net_from_arch

NCHW = (0, 2, 3, 1)  # an NCHW torch map held NHWC: jaxprune axis i is torch dim NCHW[i]
_aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """A tensor of the torch graph on the jaxprune side: the layer that computes it
    (its index in mapping order, or INPUT) and `perm` (jaxprune axis i is torch dim
    perm[i])."""
    src: int | str
    perm: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class _Param:
    """A parameter or buffer: its state-dict key and the shape the graph reads it in
    (a view of it may reshape it)."""
    key: str
    shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class _BatchNormOut:
    """BatchNorm's (output, mean, inverse std) triple: only item 0 is ever read."""
    out: _Tensor


# values that are not tensors of the model: only the ops that make them read them
_SIZE = "a symbolic size"               # aten.sym_size (a dynamic batch), read by views
_STATISTIC = "a BatchNorm statistic"    # items 1 and 2 of BatchNorm's triple


@dataclasses.dataclass
class _Layer:
    """A layer the graph maps to, before it is named."""
    kind: str
    config: dict
    inputs: tuple
    node: torch.fx.Node
    op: str                       # short name for layers named `<module path>.<op>`
    prefix: str | None = None     # the module path its parameters live under


def _bind(node) -> dict:
    """The op's arguments by schema name, defaults filled in."""
    out = {}
    for i, arg in enumerate(node.target._schema.arguments):
        if i < len(node.args):
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            out[arg.name] = arg.default_value
    return out


def _op_name(node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket._qualified_op_name.replace("::", ".")
    return getattr(target, "__name__", str(target))


def _owner(node) -> tuple[str, str, str]:
    """(call key, module path, module class) of the innermost module that ran `node`;
    the key ends in `@k` on the module's k-th repeated call."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", "", "?"
    key, (path, cls) = list(stack.items())[-1]
    cls = cls if isinstance(cls, str) else getattr(cls, "__qualname__", str(cls))
    return key, path, cls.rsplit(".", 1)[-1]


def _shape(node) -> tuple:
    """The shape of a node's tensor; None for a symbolic (dynamic) size."""
    out = []
    for d in node.meta["val"].shape:
        if isinstance(d, torch.SymInt):
            d = d.node.maybe_as_int()
        out.append(None if d is None else int(d))
    return tuple(out)


def _pair(v) -> tuple[int, int]:
    """An (h, w) argument of a 2-D op: an int or a list of one or two (torch's forms)."""
    v = [v] if isinstance(v, int) else list(v)
    return int(v[0]), int(v[-1])


class _Mapper:
    """Walks an exported program's graph once and lists the layers it maps to."""

    def __init__(self, program, what: str):
        self.program, self.what = program, what
        sig = program.graph_signature
        self.keys = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
        self.layers: list[_Layer] = []
        self.values: dict = {}
        self.input_shape: tuple | None = None

    # -- refusals ------------------------------------------------------------------------

    def refuse(self, node, why: str, supported: str | None = None):
        _, path, cls = _owner(node)
        where = f"module '{path}', {cls}" if path else f"in {cls}.forward"
        supported = supported or f"jaxprune maps these ATen ops: {SUPPORTED}"
        raise UserError(f"cannot import {self.what}: {_op_name(node)} at graph node "
                        f"'{node.name}' ({where}) {why}; {supported}")

    def tensor(self, node, arg) -> _Tensor:
        v = self.values.get(arg) if isinstance(arg, torch.fx.Node) else None
        if not isinstance(v, _Tensor):
            what = ("a parameter" if isinstance(v, _Param) else v if isinstance(v, str)
                    else f"the constant {arg!r}")
            self.refuse(node, f"reads {what} where a tensor computed from the image is "
                              f"expected", "jaxprune maps such an op only on feature maps")
        return v

    def param(self, node, arg, suffix: str, prefix: str | None = None) -> str:
        """The module path of parameter `arg`, which must be `<path>.<suffix>`."""
        v = self.values.get(arg) if isinstance(arg, torch.fx.Node) else None
        if not isinstance(v, _Param):
            self.refuse(node, f"takes its {suffix} from a computation, not from a parameter",
                        "jaxprune maps layers whose weights are parameters or buffers")
        path, _, last = v.key.rpartition(".")
        if last != suffix or not path or (prefix is not None and path != prefix):
            want = f"'{prefix}.{suffix}'" if prefix is not None else f"'<module>.{suffix}'"
            self.refuse(node, f"reads the parameter '{v.key}' as its {suffix}",
                        f"jaxprune reads it from {want}, as torch's own modules name it")
        return path

    def spatial(self, node, arg) -> _Tensor:
        """An NCHW image map (held NHWC), as convs and pools read."""
        v = self.tensor(node, arg)
        if v.perm != NCHW:
            self.refuse(node, f"reads a tensor whose torch dims {list(v.perm)} are not an "
                              f"NCHW map", "convs and pools read NCHW maps (batch, "
                              "channels, height, width)")
        return v

    def channels_at(self, node, v: _Tensor, dim: int) -> None:
        """An op over torch dim `dim` needs it as the jaxprune channel (last) axis."""
        if v.perm[-1] != dim % len(v.perm):
            self.refuse(node, f"works on torch dim {dim}, which is not the channel axis of "
                              f"its input here", "jaxprune maps it over channels only (dim 1 "
                              "of NCHW maps, the last dim of channels-last tensors and "
                              "features)")

    # -- the walk ------------------------------------------------------------------------

    def add(self, node, kind: str, config: dict, inputs, op: str, prefix=None) -> int:
        """Record a layer; returns its index."""
        self.layers.append(_Layer(kind, config, tuple(inputs), node, op, prefix))
        return len(self.layers) - 1

    def run(self) -> _Tensor:
        out = None
        for node in self.program.graph.nodes:
            if node.op == "placeholder":
                self.values[node] = self.placeholder(node)
            elif node.op == "call_function":
                handler = OPS.get(_op_name(node))
                if handler is None:
                    self.refuse(node, "is not supported")
                self.values[node] = handler(self, node)
            elif node.op == "output":
                results = node.args[0]
                if not (isinstance(results, (tuple, list)) and len(results) == 1):
                    self.refuse(node, f"returns {len(results)} outputs",
                                "jaxprune imports models that return one tensor of logits")
                out = self.tensor(node, results[0])
            else:
                self.refuse(node, f"is a {node.op} node", "jaxprune maps ATen ops only")
        if out.src == INPUT or out.src != len(self.layers) - 1 or out.perm != (0, 1):
            raise UserError(f"cannot import {self.what}: its output is not (batch, classes) "
                            f"logits computed by its last op (output shape "
                            f"{_shape(self.program.graph.output_node().args[0][0])})")
        return out

    def placeholder(self, node):
        key = self.keys.get(node.name)
        if key is not None:
            return _Param(key, _shape(node))
        sig = self.program.graph_signature
        if node.name not in sig.user_inputs:
            self.refuse(node, "is a constant or object the module holds outside its state "
                              "dict", "jaxprune imports parameters and buffers")
        if self.input_shape is not None:
            self.refuse(node, "is a second input", "jaxprune imports models of one image input")
        self.input_shape = _shape(node)
        if len(self.input_shape) != 4:
            self.refuse(node, f"is an input of shape {self.input_shape}",
                        "jaxprune imports models of NCHW image inputs")
        return _Tensor(INPUT, NCHW)


# -- one handler per ATen op: (mapper, node) -> the value of the node ------------------------

def _conv(mp: _Mapper, node):
    a = _bind(node)
    x = mp.spatial(node, a["input"])
    prefix = mp.param(node, a["weight"], "weight")
    if a["bias"] is not None:
        mp.param(node, a["bias"], "bias", prefix)
    cout, cin_g, kh, kw = mp.values[a["weight"]].shape
    stride, dilation = _pair(a["stride"]), _pair(a["dilation"])
    padding = a["padding"]
    if isinstance(padding, str):  # aten.conv2d.padding: 'valid' or 'same'
        if padding == "same" and stride == (1, 1) and all(d * (k - 1) % 2 == 0 for d, k in
                                                          zip(dilation, (kh, kw))):
            padding = [d * (k - 1) // 2 for d, k in zip(dilation, (kh, kw))]
        elif padding == "valid":
            padding = [0, 0]
        else:
            mp.refuse(node, f"pads '{padding}' asymmetrically",
                      "jaxprune maps symmetric padding: an int or pair, 'valid', or 'same' "
                      "with stride 1 and an odd dilated kernel")
    ph, pw = _pair(padding)
    groups = int(a["groups"])
    config = dict(cin=cin_g * groups, cout=cout, kernel=[kh, kw], stride=list(stride),
                  padding=[[ph, ph], [pw, pw]], groups=groups, dilation=list(dilation),
                  bias=a["bias"] is not None)
    return _Tensor(mp.add(node, "Conv", config, [x.src], "conv", prefix), NCHW)


def _batch_norm(mp: _Mapper, node):
    a = _bind(node)
    x = mp.tensor(node, a["input"])
    if a["weight"] is None or a["bias"] is None:
        mp.refuse(node, "is a BatchNorm without affine parameters",
                  "jaxprune maps BatchNorm(affine=True), torch's default")
    prefix = mp.param(node, a["weight"], "weight")
    for suffix in ("bias", "running_mean", "running_var"):
        mp.param(node, a[suffix], suffix, prefix)
    mp.channels_at(node, x, 1)
    config = dict(num_features=mp.values[a["weight"]].shape[0], epsilon=float(a["eps"]),
                  momentum=1.0 - float(a["momentum"]))
    return _BatchNormOut(_Tensor(mp.add(node, "BatchNorm", config, [x.src], "bn", prefix),
                                 x.perm))


def _getitem(mp: _Mapper, node):
    source, index = node.args
    v = mp.values.get(source)
    if not isinstance(v, _BatchNormOut):
        mp.refuse(node, f"reads item {index} of {source.name}",
                  "jaxprune maps ops that return one tensor, and BatchNorm")
    return v.out if index == 0 else _STATISTIC


def _linear(mp: _Mapper, node):
    a = _bind(node)
    x = mp.tensor(node, a["input"])
    mp.channels_at(node, x, -1)
    prefix = mp.param(node, a["weight"], "weight")
    if a["bias"] is not None:
        mp.param(node, a["bias"], "bias", prefix)
    dout, din = mp.values[a["weight"]].shape
    config = dict(din=din, dout=dout, bias=a["bias"] is not None)
    return _Tensor(mp.add(node, "Linear", config, [x.src], "linear", prefix), x.perm)


def _layer_norm(mp: _Mapper, node):
    a = _bind(node)
    x = mp.tensor(node, a["input"])
    if len(a["normalized_shape"]) != 1 or a["weight"] is None or a["bias"] is None:
        mp.refuse(node, f"normalizes over {list(a['normalized_shape'])} "
                        f"{'without' if a['weight'] is None else 'with'} affine parameters",
                  "jaxprune maps LayerNorm over the last dim with weight and bias")
    mp.channels_at(node, x, -1)
    prefix = mp.param(node, a["weight"], "weight")
    mp.param(node, a["bias"], "bias", prefix)
    config = dict(dim=int(a["normalized_shape"][0]), epsilon=float(a["eps"]))
    return _Tensor(mp.add(node, "LayerNorm", config, [x.src], "norm", prefix), x.perm)


def _activation(kind: str):
    def handler(mp: _Mapper, node):
        x = mp.tensor(node, node.args[0])
        return _Tensor(mp.add(node, "Act", dict(kind=kind), [x.src], kind), x.perm)
    return handler


def _hardtanh(mp: _Mapper, node):
    a = _bind(node)
    if (a["min_val"], a["max_val"]) != (0.0, 6.0):
        mp.refuse(node, f"clamps to [{a['min_val']}, {a['max_val']}]",
                  "jaxprune maps hardtanh(0, 6), i.e. ReLU6")
    return _activation("relu6")(mp, node)


def _gelu(mp: _Mapper, node):
    if _bind(node)["approximate"] != "none":
        mp.refuse(node, f"is the '{_bind(node)['approximate']}' approximation",
                  "jaxprune maps the exact GELU (approximate='none')")
    return _activation("gelu")(mp, node)


def _same_layout(mp: _Mapper, node, xs: list[_Tensor]) -> tuple:
    if len({x.perm for x in xs}) != 1:
        mp.refuse(node, "combines tensors held in different layouts",
                  "jaxprune combines tensors whose dims are in the same order")
    return xs[0].perm


def _add(mp: _Mapper, node):
    a = _bind(node)
    if a["alpha"] != 1 or not isinstance(a["other"], torch.fx.Node):
        mp.refuse(node, "adds a constant or a scaled tensor", "jaxprune maps sums of tensors")
    xs = [mp.tensor(node, a["self"]), mp.tensor(node, a["other"])]
    perm = _same_layout(mp, node, xs)
    return _Tensor(mp.add(node, "Add", {}, [x.src for x in xs], "add"), perm)


def _mul(mp: _Mapper, node):
    a = _bind(node)
    args = [a["self"], a["other"]]
    params = [v for v in args if isinstance(mp.values.get(v), _Param)]
    if len(params) == 1:  # a learned factor per channel: ConvNeXt's layer scale
        p = mp.values[params[0]]
        x = mp.tensor(node, args[1 - args.index(params[0])])
        shape = _shape(node)
        lead = len(shape) - len(p.shape)
        big = [lead + i for i, n in enumerate(p.shape) if n != 1]
        if lead < 1 or len(big) != 1 or p.shape[big[0] - lead] != shape[big[0]]:
            mp.refuse(node, f"multiplies by the parameter '{p.key}' of shape {list(p.shape)}",
                      "jaxprune maps a product with one factor per channel")
        mp.channels_at(node, x, big[0])
        prefix, _, name = p.key.rpartition(".")
        if not prefix:
            mp.refuse(node, f"multiplies by '{p.key}', a parameter of the root module",
                      "jaxprune maps per-channel factors held by a submodule")
        torch_shape = list(_value(mp.program, p.key).shape)
        config = dict(dim=p.shape[big[0] - lead], param=name, torch_shape=torch_shape)
        return _Tensor(mp.add(node, "Scale", config, [x.src], "scale", prefix), x.perm)
    if not all(isinstance(v, torch.fx.Node) for v in args):
        mp.refuse(node, "multiplies by a constant", "jaxprune maps products of tensors and "
                        "per-channel parameters")
    xs = [mp.tensor(node, v) for v in args]
    perm = _same_layout(mp, node, xs)
    return _Tensor(mp.add(node, "Mul", {}, [x.src for x in xs], "mul"), perm)


def _cat(mp: _Mapper, node):
    a = _bind(node)
    xs = [mp.tensor(node, t) for t in a["tensors"]]
    if len(xs) == 1:
        return xs[0]
    perm = _same_layout(mp, node, xs)
    mp.channels_at(node, xs[0], a["dim"])
    return _Tensor(mp.add(node, "Concat", {}, [x.src for x in xs], "cat"), perm)


def _square(mp: _Mapper, node, value, name: str) -> int:
    h, w = _pair(value)
    if h != w:
        mp.refuse(node, f"has a {h}x{w} {name}", f"jaxprune's pools take a square {name}")
    return h


def _max_pool(mp: _Mapper, node):
    a = _bind(node)
    x = mp.spatial(node, a["self"])
    if a["ceil_mode"] or _pair(a["dilation"]) != (1, 1):
        mp.refuse(node, "uses ceil_mode or dilation", "jaxprune maps floor-mode, undilated "
                        "max pooling")
    k = _square(mp, node, a["kernel_size"], "kernel")
    s = _square(mp, node, a["stride"] or a["kernel_size"], "stride")
    config = dict(kernel=k, stride=s, padding=_square(mp, node, a["padding"], "padding"))
    return _Tensor(mp.add(node, "MaxPool", config, [x.src], "maxpool"), NCHW)


def _avg_pool(mp: _Mapper, node):
    a = _bind(node)
    x = mp.spatial(node, a["self"])
    if a["ceil_mode"] or a["divisor_override"] is not None:
        mp.refuse(node, "uses ceil_mode or divisor_override", "jaxprune maps floor-mode "
                        "average pooling")
    k = _square(mp, node, a["kernel_size"], "kernel")
    s = _square(mp, node, a["stride"] or a["kernel_size"], "stride")
    config = dict(kernel=k, stride=s, padding=_square(mp, node, a["padding"], "padding"),
                  count_include_pad=bool(a["count_include_pad"]))
    return _Tensor(mp.add(node, "AvgPool", config, [x.src], "avgpool"), NCHW)


def _adaptive_avg_pool(mp: _Mapper, node):
    a = _bind(node)
    x = mp.spatial(node, a["self"])
    if None in list(a["output_size"]):
        mp.refuse(node, "keeps a dim (output size None)", "jaxprune maps fixed output sizes")
    out_hw = list(_pair(a["output_size"]))
    return _Tensor(mp.add(node, "AdaptiveAvgPool", dict(out_hw=out_hw), [x.src], "avgpool"),
                   NCHW)


def _mean(mp: _Mapper, node):
    a = _bind(node)
    x = mp.tensor(node, a["self"])
    axes = {x.perm.index(d % len(x.perm)) for d in (a["dim"] or ())}
    if len(x.perm) != 4 or axes != {1, 2} or a["dtype"] is not None:
        mp.refuse(node, f"averages over torch dims {a['dim']}",
                  "jaxprune maps means over height and width")
    if a["keepdim"]:
        return _Tensor(mp.add(node, "AdaptiveAvgPool", dict(out_hw=[1, 1]), [x.src],
                              "avgpool"), x.perm)
    kept = sorted((x.perm[0], x.perm[3]))  # torch renumbers the dims it keeps
    return _Tensor(mp.add(node, "GlobalAvgPool", {}, [x.src], "avgpool"),
                   (kept.index(x.perm[0]), kept.index(x.perm[3])))


def _reshape(mp: _Mapper, node):
    source = node.args[0]
    v = mp.values.get(source)
    shape, new = _shape(source), _shape(node)
    if isinstance(v, _Param):  # a view of a parameter (a layer scale kept as (C,))
        return _Param(v.key, new)
    x = mp.tensor(node, source)
    if new == shape:
        return x
    flat = len(shape) == 4 and len(new) == 2 and new[0] == shape[0] and None not in shape[1:] \
        and new[1] == math.prod(shape[1:])
    if not flat:
        mp.refuse(node, f"reshapes {list(shape)} to {list(new)}",
                  "jaxprune maps reshapes that flatten (N, C, H, W) maps to (N, C*H*W)")
    if x.perm != NCHW:
        mp.refuse(node, "flattens a channels-last tensor", "jaxprune flattens NCHW maps")
    producer = mp.layers[x.src] if x.src != INPUT else None
    if (producer is not None and producer.kind == "AdaptiveAvgPool"
            and producer.config["out_hw"] == [1, 1] and len(producer.node.users) == 1):
        producer.kind, producer.config = "GlobalAvgPool", {}  # pool + flatten: one layer
        return _Tensor(x.src, (0, 1))
    return _Tensor(mp.add(node, "FlattenNCHW", {}, [x.src], "flatten"), (0, 1))


def _permute(mp: _Mapper, node):
    x = mp.tensor(node, node.args[0])
    dims = [d % len(x.perm) for d in node.args[1]]
    inverse = [dims.index(d) for d in range(len(dims))]
    return _Tensor(x.src, tuple(inverse[d] for d in x.perm))


def _transpose(mp: _Mapper, node):
    x = mp.tensor(node, node.args[0])
    d0, d1 = (d % len(x.perm) for d in node.args[1:3])
    swap = {d0: d1, d1: d0}
    return _Tensor(x.src, tuple(swap.get(d, d) for d in x.perm))


def _identity(mp: _Mapper, node):
    if _op_name(node) == "aten.dropout" and _bind(node)["train"]:
        mp.refuse(node, "is dropout in train mode", "trace the module in eval mode")
    return mp.tensor(node, node.args[0])


def _sym_size(mp: _Mapper, node):
    return _SIZE


def _table() -> dict:
    """ATen op (as `_op_name` writes it) -> handler."""
    table = {"aten.conv2d": _conv, "aten._native_batch_norm_legit_no_training": _batch_norm,
             "getitem": _getitem, "aten.linear": _linear,
             "aten.layer_norm": _layer_norm, "aten.hardtanh": _hardtanh, "aten.gelu": _gelu,
             "aten.add": _add, "aten.mul": _mul, "aten.cat": _cat, "aten.max_pool2d": _max_pool,
             "aten.avg_pool2d": _avg_pool, "aten.adaptive_avg_pool2d": _adaptive_avg_pool,
             "aten.mean": _mean, "aten.view": _reshape, "aten.reshape": _reshape,
             "aten._unsafe_view": _reshape, "aten.flatten": _reshape, "aten.permute": _permute,
             "aten.transpose": _transpose, "aten.dropout": _identity, "aten.clone": _identity,
             "aten.alias": _identity, "aten.detach": _identity, "aten.sym_size": _sym_size}
    for kind in ACTIVATIONS:  # relu, relu6, gelu, silu, hardswish, hardsigmoid, sigmoid
        table.setdefault(f"aten.{kind}", _activation(kind))
    return table


OPS = _table()
# for messages: the ops as a user knows them (getitem and sym_size only come with others)
_SHOWN = {"aten._native_batch_norm_legit_no_training": "batch_norm (eval)",
          "getitem": None, "aten.sym_size": None, "aten._unsafe_view": None}
SUPPORTED = ", ".join(sorted(_SHOWN.get(k, k.removeprefix("aten.")) for k in OPS
                             if _SHOWN.get(k, k) is not None))


# -- names ------------------------------------------------------------------------------------

def _names(layers: list[_Layer], what: str) -> list[str]:
    """Each layer's name (see the module doc), in mapping order."""
    paths = {_owner(layer.node)[1] for layer in layers}
    paths |= {layer.prefix for layer in layers if layer.prefix}
    # every module that holds another (its path a dot-prefix of one seen): never a leaf
    containers = {p[:i] for p in paths for i, c in enumerate(p) if c == "."} | {""}
    calls = defaultdict(list)  # module call -> its layers
    for i, layer in enumerate(layers):
        calls[_owner(layer.node)[0]].append(i)
    by_module, by_op = defaultdict(list), defaultdict(list)
    for i, layer in enumerate(layers):
        if layer.prefix is not None:
            continue
        key, path, _ = _owner(layer.node)
        # a leaf module whose call made this one layer (nn.ReLU, nn.MaxPool2d) lends it its path
        if len(calls[key]) == 1 and path not in containers and path:
            by_module[path].append(i)
        else:
            by_op[f"{path}.{layer.op}" if path else layer.op].append(i)
    names: list[str | None] = [layer.prefix for layer in layers]
    for group in (by_module, by_op):
        for base, members in group.items():
            for k, i in enumerate(members, start=1):
                names[i] = base if len(members) == 1 else f"{base}{k}"
    owners: dict[str, int] = {}
    for i, layer in enumerate(layers):
        if layer.prefix is not None and layer.prefix in owners:
            raise UserError(f"cannot import {what}: module '{layer.prefix}' runs more than "
                            f"once with its own parameters (graph nodes "
                            f"'{layers[owners[layer.prefix]].node.name}' and "
                            f"'{layer.node.name}'); jaxprune layers own their weights: give "
                            f"each call its own module")
        if layer.prefix is not None:
            owners[layer.prefix] = i
    taken = set(owners) | {INPUT}
    for i, layer in enumerate(layers):
        if layer.prefix is not None:
            continue
        name, n = names[i], 2
        while name in taken:  # a generated name that is already a module's
            name, n = f"{names[i]}_{n}", n + 1
        names[i] = name
        taken.add(name)
    return names


# -- entry points -----------------------------------------------------------------------------

def _value(program, key: str) -> torch.Tensor:
    """A parameter or buffer (a non-persistent buffer is a constant of the program)."""
    return program.state_dict[key] if key in program.state_dict else program.constants[key]


def _check_size(m: Net, size, example, what: str) -> None:
    """A model whose head reads flattened maps runs at the size it was exported for only."""
    from jaxprune.merging.profiling import tensor_shapes
    try:
        tensor_shapes(m, tuple(size))
    except (TypeError, ValueError) as e:
        raise UserError(f"cannot import {what} at {size[0]}x{size[1]}: it does not run on "
                        f"that size ({str(e).splitlines()[0]}); it was exported on "
                        f"{example[0]}x{example[1]} images: use that size") from None


def _arch(mapper: _Mapper, arch: str, input_size, num_classes: int) -> dict:
    names = _names(mapper.layers, mapper.what)
    ref = lambda v: INPUT if v == INPUT else names[v]  # noqa: E731
    graph = [{"name": names[i], "inputs": [ref(v) for v in layer.inputs], "type": layer.kind,
              "config": layer.config} for i, layer in enumerate(mapper.layers)]
    return {"format": FORMAT, "version": VERSION, "arch": arch, "num_classes": num_classes,
            "options": {}, "input_size": list(input_size),
            "in_channels": mapper.input_shape[1], "graph": graph, "masks": {}}


def from_program(program, *, arch: str = "torch", input_size=None, what: str | None = None) -> Net:
    """The `Net` of an exported program (`torch.export.export(...)`, decomposed or not),
    weights loaded from the program's state dict.

    `input_size` (H, W): the model's native size (default: the program's example input).
    `arch` goes into the spec (and `arch.json`). Raises `UserError` naming the first op
    that cannot be mapped (see the module doc)."""
    what = what or arch
    program = program.run_decompositions({})  # functional: no in-place ops, no dropout
    mapper = _Mapper(program, what)
    out = mapper.run()
    num_classes = _shape(mapper.layers[out.src].node)[-1]
    example = mapper.input_shape[2:]
    size = tuple(input_size) if input_size is not None else example
    if None in size:
        raise UserError(f"cannot import {what}: its input size is dynamic; pass input_size")
    spec = _arch(mapper, arch, size, num_classes)
    used = {v.key for v in mapper.values.values() if isinstance(v, _Param)}
    state = {k: _value(program, k).detach().cpu().numpy() for k in used}
    m = net_from_arch(spec, what, state)
    if size != example:
        _check_size(m, size, example, what)
    return m


def trace(module: torch.nn.Module, input_size=(224, 224), *, in_channels: int = 3,
          arch: str | None = None) -> Net:
    """`module` (an `nn.Module` taking NCHW images, returning logits) as a jaxprune `Net`,
    traced with `torch.export` on one random image of `input_size` (H, W) in eval mode
    (the module's train/eval mode is restored after). `arch` names it in the spec
    (default `torch:<module>:<class>`). Raises `UserError` when torch cannot export it or
    an op cannot be mapped."""
    cls = type(module)
    arch = arch or f"torch:{cls.__module__}:{cls.__qualname__}"
    h, w = input_size
    x = torch.randn(1, in_channels, h, w, generator=torch.Generator().manual_seed(0))
    training = module.training
    try:
        with torch.no_grad():
            program = torch.export.export(module.eval(), (x,))
    except Exception as e:  # torch raises many kinds; the first line says what failed
        reason = " ".join(str(e).strip().splitlines()[:1]) or type(e).__name__
        raise UserError(f"cannot import {cls.__name__}: torch.export could not trace it on a "
                        f"{h}x{w} image ({type(e).__name__}: {reason}); a model must run on "
                        f"one (1, {in_channels}, H, W) tensor without data-dependent "
                        f"Python control flow") from None
    finally:
        module.train(training)
    return from_program(program, arch=arch, input_size=(h, w), what=cls.__name__)
