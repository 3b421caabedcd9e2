"""Exact composition of a run of linear layers into one (DESIGN.md §7).

A `SpatialMap` is the linear part of "region input -> this tensor" for a run of
convolutions, BatchNorms, identities and residual sums. Per axis, output
position `i` reads input positions `stride*i - offset + u` for taps
`u in [0, extent)`. Composition rules: kernel `k1 + (k2-1)*s1`, stride
`s1*s2`, grouped and depthwise kernels kept grouped where the result is
(depthwise with anything keeps the other side's groups; otherwise the gcd).

Borders. A later conv zero-pads an *intermediate* tensor; the composed kernel
instead sees values computed from real input at those positions. So the exact
kernel at output position `(i, j)` is the composed kernel without the paths
through padded intermediate positions. In 1-D, with z[i] = sum_a w1[a] x[i-1+a]
and y[0] = w2[1] z[0] + w2[2] z[1] (z[-1] is padding), the 5-tap composition
adds w2[0] w1[2] x[0] at y[0], which the original never computes.
Which paths drop depends only on *which* taps are out of range, per axis, so
each axis has a few position classes: class 0 = every intermediate tap valid
(the interior), others near the borders. A map keeps one kernel per pair
(row class, column class). Out-of-range taps of a *pointwise* map (1x1 chains
from the input, e.g. MobileNetV2's expand conv) read input padding, which is
zero either way, so they do not create classes: there only the bias differs at
the border. Biases are not tracked here: the fused bias (map) is the run
applied to zeros, `f(0)` (`fold.apply_numpy`).

`DenseMap` is the same for Linear layers on the last axis (no borders).
Kernels compose in float64; `weights=False` computes only the geometry, which
is what the cost model needs before any weights are composed.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

INVALID = -1


class NotFusable(Exception):
    """This run cannot be one layer (the message says why); it is kept as it is."""


@dataclasses.dataclass(frozen=True)
class Axis:
    """Geometry of one spatial axis of a map from the region input."""
    size: int          # positions of this tensor along the axis
    in_size: int       # positions of the region input along the axis
    stride: int
    offset: int        # position i reads input positions stride*i - offset + u
    extent: int        # number of taps u
    cls: tuple         # class of each position; 0 = every intermediate tap valid

    @property
    def classes(self) -> list[int]:
        """Class ids in use, 0 always first (it exists even when no position has it)."""
        return sorted(set(self.cls) | {0})

    def relevant(self, positions) -> np.ndarray:
        """Taps that read a real (not padded) input position for some of `positions`."""
        u = np.arange(self.extent)
        rel = np.zeros(self.extent, bool)
        for i in positions:
            src = self.stride * i - self.offset + u
            rel |= (src >= 0) & (src < self.in_size)
        return rel


def _intern(keys: list, ids: dict, key) -> int:
    if key not in ids:
        ids[key] = len(keys)
        keys.append(key)
    return ids[key]


def _axis_conv(ax: Axis, k: int, s: int, lo: int, hi: int, pointwise: bool):
    """The axis after a conv (k taps, stride s, padding lo/hi) and each new class's taps.

    `keys[c][b]` is the class of the position tap b of class c reads, or INVALID
    when it is the conv's zero padding of an intermediate tensor.
    """
    n = (ax.size + lo + hi - k) // s + 1
    if n < 1:
        raise NotFusable(f"a {k}-tap conv does not fit a map of {ax.size}")
    keys, ids = [], {}
    _intern(keys, ids, (0,) * k)
    cls = []
    for i in range(n):
        key = []
        for b in range(k):
            q = s * i - lo + b
            if 0 <= q < ax.size:
                key.append(ax.cls[q])
            else:  # padding: of the input itself when pointwise, which reads zeros anyway
                key.append(0 if pointwise else INVALID)
        cls.append(_intern(keys, ids, tuple(key)))
    new = Axis(n, ax.in_size, ax.stride * s, ax.offset + ax.stride * lo,
               ax.extent + (k - 1) * ax.stride, tuple(cls))
    return new, keys


def _axis_add(a: Axis, b: Axis):
    if a.size != b.size or a.stride != b.stride:
        raise NotFusable(f"a residual sum of branches with strides {a.stride} and {b.stride}")
    off = max(a.offset, b.offset)
    da, db = off - a.offset, off - b.offset
    extent = max(da + a.extent, db + b.extent)
    keys, ids = [], {}
    _intern(keys, ids, (0, 0))
    cls = tuple(_intern(keys, ids, (x, y)) for x, y in zip(a.cls, b.cls))
    return Axis(a.size, a.in_size, a.stride, off, extent, cls), keys, (da, db)


def _shift(box, du: int, dv: int):
    return None if box is None else (box[0] + du, box[1] + du, box[2] + dv, box[3] + dv)


def _union(a, b):
    if a is None or b is None:
        return a if b is None else b
    return (min(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), max(a[3], b[3]))


def regroup(k: np.ndarray, g_from: int, g_to: int) -> np.ndarray:
    """A kernel (..., cin/g_from, cout) of g_from groups as one of g_to groups (g_to | g_from)."""
    if g_from == g_to:
        return k
    ci, cout = k.shape[-2:]
    r = g_from // g_to           # fine groups per coarse group
    per = cout // g_from         # output channels per fine group
    out = np.zeros(k.shape[:-2] + (ci * r, cout), k.dtype)
    for t in range(r):           # fine groups with index t inside their coarse group
        cols = (np.arange(cout) // per) % r == t
        out[..., t * ci:(t + 1) * ci, cols] = k[..., :, cols]
    return out


def _compose_groups(cin: int, cmid: int, g1: int, cout: int, g2: int) -> tuple[int, str]:
    if g2 == cmid == cout:
        return g1, "scale_out"   # the second layer is channelwise (depthwise, BN)
    if g1 == cin == cmid:
        return g2, "scale_in"    # the first is channelwise
    return math.gcd(g1, g2), "general"


def _compose_all_taps(a: np.ndarray, g1: int, w: np.ndarray, g2: int, mode: str,
                      g: int) -> np.ndarray:
    """a: (K, K, cin/g1, cmid) then every tap of w: (kh, kw, cmid/g2, cout)
    -> (K, K, cin/g, kh, kw, cout), one product per tap."""
    kh, kw, _, cout = w.shape
    if mode == "scale_out":
        return a[:, :, :, None, None, :] * w[:, :, 0, :]
    K1, K2, _, cmid = a.shape
    if mode == "scale_in":
        per_in, per_out = cmid // g2, cout // g2
        ch = (np.arange(cout)[None, :] // per_out) * per_in + np.arange(per_in)[:, None]
        return a[..., 0, :][..., ch][:, :, :, None, None, :] * w.transpose(2, 0, 1, 3)
    ae = regroup(a, g1, g)
    we = regroup(w, g2, g)                                # (kh, kw, cmid/g, cout)
    ci = ae.shape[2]
    if g == 1:
        out = ae.reshape(-1, cmid) @ we.transpose(2, 0, 1, 3).reshape(cmid, -1)
        return out.reshape(K1, K2, ci, kh, kw, cout)
    ae = ae.reshape(K1, K2, ci, g, cmid // g)
    we = we.reshape(kh, kw, cmid // g, g, cout // g)
    out = np.einsum("hwigm,bdmgo->hwibdgo", ae, we)
    return out.reshape(K1, K2, ci, kh, kw, cout)


@dataclasses.dataclass
class SpatialMap:
    rows: Axis
    cols: Axis
    cin: int
    cout: int
    groups: int
    pointwise: bool                       # 1x1, stride 1, no padding from the input
    kernels: dict | None                  # (row class, col class) -> (Kh, Kw, cin/g, cout)
    # (row class, col class) -> bounding box (u0, u1, v0, v1) of where that pair's kernel
    # may differ from the interior one (None: nowhere); known without the weights
    deltas: dict = dataclasses.field(default_factory=lambda: {(0, 0): None})
    # most bytes the exact composition up to here holds at once (kernels + temporaries)
    peak_bytes: int = 0
    biased: bool = False          # some layer so far adds a bias (or BatchNorm shift)
    bias_varies: bool = False     # ... which a padded conv then sees as zeros at the border

    @property
    def stride(self):
        return self.rows.stride, self.cols.stride

    @staticmethod
    def identity(h: int, w: int, c: int, weights: bool = True) -> "SpatialMap":
        ax = lambda n: Axis(n, n, 1, 0, 1, (0,) * n)  # noqa: E731
        kernels = {(0, 0): np.ones((1, 1, 1, c))} if weights else None
        return SpatialMap(ax(h), ax(w), c, c, c, True, kernels)

    def conv(self, w: np.ndarray | None, kernel: tuple[int, int], stride, padding, groups: int,
             cout: int, has_bias: bool = False) -> "SpatialMap":
        """This map followed by a conv. `w` (kh, kw, cmid/groups, cout) or None for geometry."""
        (kh, kw), (sh, sw) = kernel, stride
        (plo, phi), (qlo, qhi) = padding
        rows, rkeys = _axis_conv(self.rows, kh, sh, plo, phi, self.pointwise)
        cols, ckeys = _axis_conv(self.cols, kw, sw, qlo, qhi, self.pointwise)
        g, mode = _compose_groups(self.cin, self.cout, self.groups, cout, groups)
        pointwise = (self.pointwise and (kh, kw, sh, sw) == (1, 1, 1, 1)
                     and (plo, phi, qlo, qhi) == (0, 0, 0, 0))
        kernels = None
        if w is not None and self.kernels is not None:
            kernels = self._conv_kernels(w, rkeys, ckeys, rows.extent, cols.extent, groups, mode, g)
        full = (0, self.rows.extent - 1, 0, self.cols.extent - 1)
        deltas = {}
        for r, rk in enumerate(rkeys):
            for c, ck in enumerate(ckeys):
                box = None
                for b, rr in enumerate(rk):
                    for d, cc in enumerate(ck):
                        if rr == cc == 0:
                            continue
                        # a dropped path removes the whole interior part of that tap
                        src = full if INVALID in (rr, cc) else self.deltas[(rr, cc)]
                        box = _union(box, _shift(src, b * self.rows.stride, d * self.cols.stride))
                deltas[(r, c)] = box
        pairs = len(self.rows.classes) * len(self.cols.classes)
        temporaries = 8 * pairs * self.rows.extent * self.cols.extent * (self.cin // g) * kh * kw * cout
        new = SpatialMap(rows, cols, self.cin, cout, g, pointwise, kernels, deltas)
        new.peak_bytes = max(self.peak_bytes, self.kernel_bytes() + temporaries + new.kernel_bytes())
        new.biased = self.biased or has_bias
        new.bias_varies = self.bias_varies or (self.biased and max(plo, phi, qlo, qhi) > 0)
        return new

    def _conv_kernels(self, w, rkeys, ckeys, ext_h, ext_w, groups, mode, g) -> dict:
        """Kernel of every new class pair: the sum over its valid taps of (this map's kernel
        for the class the tap reads) x (the tap), shifted to the tap's place. Border
        pairs are built from the interior one by changing only the taps that differ."""
        Sh, Sw = self.rows.stride, self.cols.stride
        Kh, Kw = self.rows.extent, self.cols.extent
        parts = {}

        def part(x, y, b, d):
            """This map's kernel of pair (x, y) times tap (b, d): all taps at once for the
            interior pair (every tap needs it), one tap at a time for border pairs."""
            if (x, y) == (0, 0):
                if (0, 0) not in parts:
                    parts[(0, 0)] = _compose_all_taps(self.kernels[(0, 0)], self.groups, w,
                                                      groups, mode, g)
                return parts[(0, 0)][:, :, :, b, d]
            if (x, y, b, d) not in parts:
                parts[(x, y, b, d)] = _compose_all_taps(self.kernels[(x, y)], self.groups,
                                                        w[b:b + 1, d:d + 1], groups, mode,
                                                        g)[:, :, :, 0, 0]
            return parts[(x, y, b, d)]

        def shift_add(acc, p, b, d, sign):
            acc[b * Sh:b * Sh + Kh, d * Sw:d * Sw + Kw] += sign * p

        interior = np.zeros((ext_h, ext_w, self.cin // g, w.shape[-1]))
        for b in range(w.shape[0]):
            for d in range(w.shape[1]):
                shift_add(interior, part(0, 0, b, d), b, d, 1.0)
        kernels = {}
        for r, rk in enumerate(rkeys):
            for c, ck in enumerate(ckeys):
                if r == c == 0:
                    kernels[(0, 0)] = interior
                    continue
                acc = interior.copy()
                for b, rr in enumerate(rk):
                    for d, cc in enumerate(ck):
                        if rr == cc == 0:
                            continue  # same as the interior
                        shift_add(acc, part(0, 0, b, d), b, d, -1.0)
                        if rr != INVALID and cc != INVALID:
                            shift_add(acc, part(rr, cc, b, d), b, d, 1.0)
                kernels[(r, c)] = acc
        return kernels

    def channelwise(self, scale: np.ndarray | None) -> "SpatialMap":
        """This map followed by a per-channel scale and shift (an eval-mode BatchNorm)."""
        w = None if scale is None else np.asarray(scale, np.float64).reshape(1, 1, 1, -1)
        return self.conv(w, (1, 1), (1, 1), ((0, 0), (0, 0)), self.cout, self.cout, True)

    def add(self, other: "SpatialMap") -> "SpatialMap":
        if self.cout != other.cout or self.cin != other.cin:
            raise NotFusable(f"a residual sum of {self.cout} and {other.cout} channels")
        rows, rkeys, (ra, rb) = _axis_add(self.rows, other.rows)
        cols, ckeys, (ca, cb) = _axis_add(self.cols, other.cols)
        g = math.gcd(self.groups, other.groups)
        kernels = None
        if self.kernels is not None and other.kernels is not None:
            kernels = {}
            for r, (r1, r2) in enumerate(rkeys):
                for c, (c1, c2) in enumerate(ckeys):
                    acc = np.zeros((rows.extent, cols.extent, self.cin // g, self.cout))
                    for m, (x, y), (dr, dc) in ((self, (r1, c1), (ra, ca)),
                                                (other, (r2, c2), (rb, cb))):
                        k = regroup(m.kernels[(x, y)], m.groups, g)
                        acc[dr:dr + k.shape[0], dc:dc + k.shape[1]] += k
                    kernels[(r, c)] = acc
        deltas = {(r, c): _union(_shift(self.deltas[(r1, c1)], ra, ca),
                                 _shift(other.deltas[(r2, c2)], rb, cb))
                  for r, (r1, r2) in enumerate(rkeys) for c, (c1, c2) in enumerate(ckeys)}
        new = SpatialMap(rows, cols, self.cin, self.cout, g,
                         self.pointwise and other.pointwise, kernels, deltas)
        new.peak_bytes = max(self.peak_bytes, other.peak_bytes,
                             self.kernel_bytes() + other.kernel_bytes() + new.kernel_bytes())
        new.biased = self.biased or other.biased
        new.bias_varies = self.bias_varies or other.bias_varies
        return new

    def kernel_bytes(self) -> int:
        """Memory the exact composition of this map holds (float64 kernels of every pair)."""
        pairs = len(self.rows.classes) * len(self.cols.classes)
        return 8 * pairs * self.rows.extent * self.cols.extent * (self.cin // self.groups) * self.cout


@dataclasses.dataclass
class DenseMap:
    """Linear part of a run of Linear / channelwise layers on the last axis, kept as the
    factors of a product (multiplied in the cheapest order at the end: a 25088->4096->10
    classifier never forms a 25088x4096 product). A map that is still channelwise keeps
    one 1-D factor, its diagonal; the first Linear takes the diagonal into its matrix.

    `stored` and `peak` count bytes (float64) in geometry mode too (no factors): what the
    factors hold, and the most held at once so far (a residual sum forms both sides).
    Fusing the run into one layer needs `peak_bytes + product_bytes`."""
    cin: int
    cout: int
    factors: tuple | None         # None in geometry mode
    diagonal: bool                # still channelwise (identities, BatchNorms only)
    stored: int = 0
    peak: int = 0

    @staticmethod
    def identity(c: int, weights: bool = True) -> "DenseMap":
        return DenseMap(c, c, (np.ones(c),) if weights else None, True, 8 * c, 8 * c)

    def dense(self) -> np.ndarray:
        """The (cin, cout) matrix."""
        if self.diagonal:
            return np.diag(self.factors[0])
        return self.factors[0] if len(self.factors) == 1 else np.linalg.multi_dot(self.factors)

    @property
    def peak_bytes(self) -> int:
        """Bytes held at the peak of composing this map so far; it only grows along a run."""
        return max(self.peak, self.stored)

    @property
    def product_bytes(self) -> int:
        """Bytes of the (cin, cout) product `dense` forms from the factors, at the end of a
        run only: a longer run may need less (25088->4096->10 forms 25088x10)."""
        return 0 if self.diagonal else 8 * self.cin * self.cout

    def linear(self, w: np.ndarray | None, cout: int) -> "DenseMap":
        f = None
        if w is not None and self.factors is not None:
            w = np.asarray(w, np.float64)
            f = (self.factors[0][:, None] * w,) if self.diagonal else self.factors + (w,)
        stored = (0 if self.diagonal else self.stored) + 8 * self.cout * cout
        return DenseMap(self.cin, cout, f, False, stored, max(self.peak, stored))

    def channelwise(self, scale: np.ndarray | None) -> "DenseMap":
        f = None
        if scale is not None and self.factors is not None:
            f = self.factors[:-1] + (self.factors[-1] * np.asarray(scale, np.float64),)
        return DenseMap(self.cin, self.cout, f, self.diagonal, self.stored, self.peak)

    def add(self, other: "DenseMap") -> "DenseMap":
        if self.cout != other.cout or self.cin != other.cin:
            raise NotFusable(f"a residual sum of {self.cout} and {other.cout} channels")
        diagonal = self.diagonal and other.diagonal
        f = None
        if self.factors is not None and other.factors is not None:
            f = ((self.factors[0] + other.factors[0],) if diagonal
                 else (self.dense() + other.dense(),))
        stored = 8 * self.cin * (1 if diagonal else self.cout)
        both = self.stored + other.stored + 3 * stored  # both sides densified, and their sum
        return DenseMap(self.cin, self.cout, f, diagonal, stored,
                        max(self.peak, other.peak, both))
