"""The protocol every layer kind follows, and the helpers the kinds share.

A layer kind is a subclass of `Layer`. It declares, in its own class, every fact
that the generic passes (conversion, export, profiling, merging) need about it:

| fact | declared as | read by |
|---|---|---|
| forward pass (NHWC) | `__call__` | models, training |
| torch counterpart | `torch_counterpart = "Name"`: a callable in `converters/torch_layers.py` taking the layer | `converters.to_torch`, `export` |
| architecture record | `config()`: the constructor's arguments, JSON-able | `arch.json` (rebuilds exported and fused models) |
| arithmetic | `macs(in_shapes, out_shape)`: multiply-accumulates per image | `jaxprune.profile`, the merge cost model |
| linear kind | `linear_kind()`: how `jaxprune.merge` treats it (below) | `jaxprune.merge` |
| weights | `torch_state()` / `load_torch_state()` (default: none) | converters |
| input sizes | `input_sizes()`: ("min" or "fixed", model (H, W)) where the layer restricts the model's input size (default: None, any) | `Net.input_sizes`, `to_torch`, `export` |
| dynamic export | `torch_dynamic_size = False` where the torch counterpart cannot be traced with symbolic height and width (default: True) | `export` |

Linear kinds: `"conv"` (the layer has `kernel` HWIO, `bias`, `kernel_size`,
`stride`, `padding`, `groups`, `cin`, `cout`), `"linear"` (`kernel` (in, out),
`bias`, `din`, `dout`), `"channelwise"` (`channel_affine()` gives a per-channel
scale and shift), `"add"` (a sum of its inputs), `"identity"`, or None: not
linear, or not fusable, so it bounds the linear runs merging fuses.

A subclass that leaves any of these out is refused when its class is defined,
so no pass ever meets a layer it knows nothing about (and never counts 0 MACs
for it by accident). Every kind is registered by class name (`Layer.kind`),
which is how `arch.json` names it; a class whose name starts with `_` is a shared
base of several kinds, not a kind.
"""
from __future__ import annotations

import inspect
from typing import ClassVar, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprune.errors import UserError

Pad = tuple[tuple[int, int], tuple[int, int]]
LINEAR_KINDS = ("conv", "linear", "channelwise", "add", "identity", None)


class Mask(nnx.Variable):
    """An activation site's mask: 1 = nonlinear, 0 = identity (state, not a static)."""


class Layer(nnx.Module):
    """Base of every layer kind; see the module doc for what a kind declares."""

    _KINDS: ClassVar[dict[str, type]] = {}
    _REQUIRED: ClassVar[tuple[str, ...]] = ("config", "macs", "linear_kind")

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__name__.startswith("_"):
            return  # a shared base of several kinds (declares part), not a kind itself
        missing = [name for name in cls._REQUIRED if getattr(cls, name) is getattr(Layer, name)]
        if not isinstance(getattr(cls, "torch_counterpart", None), str):
            missing.append("torch_counterpart")
        if missing:
            raise TypeError(f"layer kind {cls.__name__} must declare {', '.join(missing)} "
                            f"(models/layers/base.py lists what a layer kind declares)")
        if cls.__name__ in Layer._KINDS:
            raise TypeError(f"two layer kinds are named {cls.__name__}: arch.json names kinds "
                            f"by class name")
        Layer._KINDS[cls.__name__] = cls

    # -- what each kind declares ---------------------------------------------------------

    torch_counterpart: ClassVar[str]

    def config(self) -> dict:
        """The constructor's arguments (JSON-able): `type(self)(**config)` rebuilds the
        layer with fresh weights (plus `rngs=` when the constructor takes it)."""
        raise NotImplementedError

    def macs(self, in_shapes: Sequence[tuple], out_shape: tuple) -> int:
        """Multiply-accumulates per image for inputs of `in_shapes` (batch axis first,
        excluded from the count)."""
        raise NotImplementedError

    def linear_kind(self) -> str | None:
        """How merging treats this layer now (one of `LINEAR_KINDS`); may depend on state,
        e.g. an activation site is an identity only while its mask is 0."""
        raise NotImplementedError

    # -- defaults ------------------------------------------------------------------------

    def torch_state(self) -> dict[str, np.ndarray]:
        """`{suffix: array}` in torch layout (OIHW convs, (out, in) linears)."""
        return {}

    def load_torch_state(self, state: dict[str, np.ndarray], name: str) -> None:
        """Take `torch_state()`'s layout, checking every shape (`name` for errors)."""
        del state, name

    torch_dynamic_size: ClassVar[bool] = True

    def input_sizes(self) -> tuple[str, tuple[int, int]] | None:
        """("min", (H, W)): the model runs at inputs of at least H x W; ("fixed", (H, W)):
        at that size only; None: the layer takes any size."""
        return None

    def weight_layers(self) -> int:
        """Weight layers one call puts on a path (depth): the sum over sub-layers, so a
        kind made of layers (windowed attention: qkv and output projections) needs no
        declaration; convs and linears say 1."""
        return sum(child.weight_layers() for _, child in nnx.iter_children(self)
                   if isinstance(child, Layer))

    # -- the registry of kinds -----------------------------------------------------------

    @staticmethod
    def kind(name: str) -> type:
        """The layer class registered under `name` (its class name)."""
        if name not in Layer._KINDS:
            raise UserError(f"unknown layer kind {name!r} (known: {sorted(Layer._KINDS)})")
        return Layer._KINDS[name]

    @staticmethod
    def kinds() -> dict[str, type]:
        return dict(Layer._KINDS)

    @classmethod
    def from_config(cls, config: dict, rngs: nnx.Rngs) -> "Layer":
        """A layer of this kind from `config()`'s record, fresh weights."""
        if "rngs" in inspect.signature(cls.__init__).parameters:
            return cls(**config, rngs=rngs)
        return cls(**config)


# -- helpers the kinds share ------------------------------------------------------------------

def check_shape(key: str, got: tuple, expected: tuple) -> None:
    if tuple(got) != tuple(expected):
        raise UserError(
            f"shape mismatch for '{key}': the torch weights have {tuple(got)}, "
            f"the model expects {tuple(expected)} (wrong architecture or width?)")


def set_from_torch(var: nnx.Variable, value: np.ndarray, key: str, expected_torch_shape: tuple,
                   to_jax) -> None:
    """Write a torch-layout array into `var` after checking its shape."""
    check_shape(key, value.shape, expected_torch_shape)
    var.value = jnp.asarray(to_jax(np.asarray(value, dtype=np.float32)))


def pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def sym_pad(p) -> Pad:
    if isinstance(p, int):
        return ((p, p), (p, p))
    return tuple(tuple(q) for q in p)


def windows(x, kernel: tuple[int, int], stride: tuple[int, int],
            dilation: tuple[int, int] = (1, 1)) -> list:
    """The kh*kw strided views (row-major) of an already padded NHWC map that a
    window of size `kernel` moving by `stride` reads: view (i, j) holds, at every
    output position, the input under the window's tap (i, j), taps `dilation` apart."""
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    oh = (x.shape[1] - dh * (kh - 1) - 1) // sh + 1
    ow = (x.shape[2] - dw * (kw - 1) - 1) // sw + 1
    return [x[:, dh * i:dh * i + sh * (oh - 1) + 1:sh, dw * j:dw * j + sw * (ow - 1) + 1:sw]
            for i in range(kh) for j in range(kw)]
