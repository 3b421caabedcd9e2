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
zero either way, so their linear part is the interior's; only the bias differs
there (`POINTWISE_PAD`). A map also keeps one bias per class pair: the run
applied to zeros at positions of that pair.

Size-agnostic classes. The classes near the top (left) edge are the same at
every input size; near the bottom (right) edge they depend on the input size
modulo the run's stride, because with strides which last rows reach padding
depends on where the stride grid ends (a stride-2 3x3 conv: its last output
reads past the end of an odd-sized input, not of an even one). `Axis` keeps
the classes counted from each edge, one bottom variant per residue, and the
smallest input size from which they are exact at every larger size: where the
edge structures of every layer stay apart (`Axis.least`). A fixed `Axis`
instead lists every position of one input size, for maps too small for that.

`DenseMap` is the same for Linear layers on the last axis (no borders).
Kernels compose in float64; `weights=False` computes only the geometry, which
is what the cost model needs before any weights are composed.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

INVALID = -1        # a tap reads the zero padding of an intermediate tensor
# A tap reads the zero padding of a map that is pointwise from the input and biased: its
# linear part is what the interior reads (zero-padded input through 1x1 layers is zero), its
# bias is not (the original sees 0 there, not the map's bias).
POINTWISE_PAD = -2


class NotFusable(Exception):
    """This run cannot be one layer (the message says why); it is kept as it is."""


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _strip(classes: list) -> tuple:
    """The classes without the trailing interior (class 0) positions."""
    n = len(classes)
    while n and classes[n - 1] == 0:
        n -= 1
    return tuple(classes[:n])


def _linear(cls: int) -> int:
    """The class whose kernel a tap of class `cls` reads (input padding reads as interior)."""
    return 0 if cls == POINTWISE_PAD else cls


@dataclasses.dataclass(frozen=True)
class Axis:
    """Geometry of one spatial axis of a map from the region input.

    Position `i` reads input positions `stride*i - offset + u`, taps `u in [0, extent)`;
    an input of `n` positions gives `(n + shift) // stride + 1` positions here.
    Each position has a class (0: every intermediate tap valid, the interior).

    Fixed (`fixed` = n): `top` lists the class of every position of that one input size.
    Size-agnostic (`fixed` None): `top` lists the classes of the first positions, the
    same at every input size, and `bottom[n % stride]` those of the last positions (last
    first), which depend on the input size modulo the stride; every other position is
    interior. That holds for every input size `n` with `n >= bounds[n % stride]`, where the
    edge structures of every layer so far stay apart (`least()`).
    """
    stride: int
    offset: int
    extent: int
    shift: int
    top: tuple
    bottom: tuple
    bounds: tuple
    fixed: int | None

    @staticmethod
    def identity(n: int, fixed: bool) -> "Axis":
        if fixed:
            return Axis(1, 0, 1, -1, (0,) * n, ((),), (n,), n)
        return Axis(1, 0, 1, -1, (), ((),), (1,), None)

    @property
    def residues(self) -> int:
        """How many `bottom` variants: one per input size modulo the stride (1 when fixed)."""
        return len(self.bottom)

    def size(self, n: int) -> int:
        """Positions along this axis for an input of `n`."""
        return (n + self.shift) // self.stride + 1

    @property
    def classes(self) -> list[int]:
        """Class ids in use, 0 always first (it exists even when no position has it)."""
        return sorted(set(self.top).union(*self.bottom) | {0})

    def least(self) -> int:
        """The smallest input size from which this axis describes every larger one exactly."""
        if self.fixed is not None:
            return self.fixed
        s = self.stride
        first = [b + (r - b) % s for r, b in enumerate(self.bounds)]  # smallest n = r, n >= b
        return max(1, max(first) - s + 1)

    def count(self, cls: int, n: int) -> int:
        """Positions of class `cls` at input size `n`."""
        return self.top.count(cls) + self.bottom[n % self.residues].count(cls)

    def relevant(self, cls: int | None = None) -> np.ndarray:
        """Taps that read a real (not padded) input position for some position of class
        `cls` (None: any position) at some input size this axis describes."""
        u = np.arange(self.extent)
        if self.fixed is None and cls is None:
            return np.ones(self.extent, bool)
        rel = np.zeros(self.extent, bool)
        for i, x in enumerate(self.top):
            if cls is None or x == cls:
                src = self.stride * i - self.offset + u
                rel |= (src >= 0) & (src < (self.fixed if self.fixed is not None else np.inf))
        for r, last in enumerate(self.bottom):
            # position size-1-j reads input n-1 or before up to this tap
            reach = self.offset + self.stride * np.arange(len(last)) - 1 - self.shift \
                + (r + self.shift) % self.stride
            for j, x in enumerate(last):
                if x == cls:
                    rel |= u <= reach[j]
        return rel

    def conv(self, k: int, s: int, lo: int, hi: int, pad: int):
        """The axis after a conv (k taps, stride s, padding lo/hi) and each new class's taps.

        `keys[c][b]` is the class of the position tap b of class c reads, or `pad` where
        that is the conv's zero padding.
        """
        keys, ids = [], {}
        _intern(keys, ids, (0,) * k)
        key = lambda reads: _intern(keys, ids, tuple(reads))  # noqa: E731
        geometry = dict(stride=self.stride * s, offset=self.offset + self.stride * lo,
                        extent=self.extent + (k - 1) * self.stride,
                        shift=self.shift + self.stride * (1 + lo + hi - k))
        if self.fixed is not None:
            m = self.size(self.fixed)
            n = (m + lo + hi - k) // s + 1
            if n < 1:
                raise NotFusable(f"a {k}-tap conv does not fit a map of {m}")
            read = lambda q: self.top[q] if 0 <= q < m else pad  # noqa: E731
            top = tuple(key(read(s * i - lo + b) for b in range(k)) for i in range(n))
            return Axis(**geometry, top=top, bottom=((),), bounds=self.bounds,
                        fixed=self.fixed), keys
        T = len(self.top)
        read = lambda q: pad if q < 0 else self.top[q] if q < T else 0  # noqa: E731
        first = max(0, _ceil_div(T + lo, s))   # positions whose taps reach the top part
        top = _strip([key(read(s * i - lo + b) for b in range(k)) for i in range(first)])
        bottom, bounds = [], []
        for r in range(geometry["stride"]):   # input sizes n = r modulo the new stride
            last = self.bottom[r % self.residues]
            B = len(last)
            m_mod = ((r + self.shift) // self.stride + 1) % s         # this map's size mod s
            rho = (m_mod + lo + hi - k) % s                           # unused rows at its end
            read = lambda jp: pad if jp < 0 else last[jp] if jp < B else 0  # noqa: E731
            ends = max(0, _ceil_div(B + hi - rho, s))  # positions whose taps reach the bottom
            bot = _strip([key(read(s * j + k - 1 - b - hi + rho) for b in range(k))
                          for j in range(ends)])
            # this map's size m keeps both edge parts apart: an output at least, the new top
            # and bottom parts disjoint, top taps above the bottom part and bottom taps below
            # the top part
            need = max(1, k - lo - hi, s * (len(top) + len(bot) - 1) + k - lo - hi)
            if first:
                need = max(need, s * (first - 1) - lo + k + B)
            if ends:
                need = max(need, s * (ends - 1) + k - hi + rho + T)
            bottom.append(bot)
            bounds.append(max(self.bounds[r % self.residues],
                              self.stride * (need - 1) - self.shift))
        return Axis(**geometry, top=top, bottom=tuple(bottom), bounds=tuple(bounds),
                    fixed=None), keys

    def add(self, other: "Axis"):
        """The axis of a sum of two maps, each position's class the pair of theirs."""
        if self.stride != other.stride:
            raise NotFusable(f"a residual sum of branches with strides {self.stride} and "
                             f"{other.stride}")
        if self.shift != other.shift or self.fixed != other.fixed:
            raise NotFusable("a residual sum of branches of different sizes")
        off = max(self.offset, other.offset)
        da, db = off - self.offset, off - other.offset
        extent = max(da + self.extent, db + other.extent)
        keys, ids = [], {}
        _intern(keys, ids, (0, 0))

        def pairs(a: tuple, b: tuple) -> tuple:
            n = max(len(a), len(b))
            cls = [_intern(keys, ids, (x, y)) for x, y in
                   zip(a + (0,) * (n - len(a)), b + (0,) * (n - len(b)))]
            return tuple(cls) if self.fixed is not None else _strip(cls)

        top = pairs(self.top, other.top)
        bottom = tuple(pairs(a, b) for a, b in zip(self.bottom, other.bottom))
        bounds = tuple(max(a, b) for a, b in zip(self.bounds, other.bounds))
        return (Axis(self.stride, off, extent, self.shift, top, bottom, bounds, self.fixed),
                keys, (da, db))


def _intern(keys: list, ids: dict, key) -> int:
    if key not in ids:
        ids[key] = len(keys)
        keys.append(key)
    return ids[key]


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


def _bias_taps(bias: np.ndarray, w: np.ndarray, groups: int) -> np.ndarray:
    """A per-channel bias (cmid,) through every tap of w (kh, kw, cmid/groups, cout)
    on its own -> (kh, kw, cout)."""
    kh, kw, ci, cout = w.shape
    per_tap = np.einsum("gi,bdigo->bdgo", bias.reshape(groups, ci),
                        w.reshape(kh, kw, ci, groups, cout // groups))
    return per_tap.reshape(kh, kw, cout)


@dataclasses.dataclass
class SpatialMap:
    rows: Axis
    cols: Axis
    cin: int
    cout: int
    groups: int
    pointwise: bool                       # 1x1, stride 1, no padding from the input
    kernels: dict | None                  # (row class, col class) -> (Kh, Kw, cin/g, cout)
    # (row class, col class) -> bias (cout,) of positions of that pair: the run applied to
    # zeros there, which differs from the interior where a padded conv reads zeros
    biases: dict | None = None
    # (row class, col class) -> bounding box (u0, u1, v0, v1) of where that pair's kernel
    # may differ from the interior one (None: nowhere); known without the weights
    deltas: dict = dataclasses.field(default_factory=lambda: {(0, 0): None})
    # most bytes the exact composition up to here holds at once (kernels + temporaries)
    peak_bytes: int = 0
    biased: bool = False          # some layer so far adds a bias (or BatchNorm shift)

    @property
    def stride(self):
        return self.rows.stride, self.cols.stride

    @staticmethod
    def identity(h: int, w: int, c: int, weights: bool = True,
                 fixed: bool = False) -> "SpatialMap":
        """The map of an (h, w, c) tensor to itself; `fixed`: described for that size only,
        else for every size (h, w only bound the classes' geometry)."""
        kernels = {(0, 0): np.ones((1, 1, 1, c))} if weights else None
        biases = {(0, 0): np.zeros(c)} if weights else None
        return SpatialMap(Axis.identity(h, fixed), Axis.identity(w, fixed), c, c, c, True,
                          kernels, biases)

    def conv(self, w: np.ndarray | None, kernel: tuple[int, int], stride, padding, groups: int,
             cout: int, has_bias: bool = False, bias: np.ndarray | None = None) -> "SpatialMap":
        """This map followed by a conv. `w` (kh, kw, cmid/groups, cout) and `bias` (cout,)
        or None for geometry."""
        (kh, kw), (sh, sw) = kernel, stride
        (plo, phi), (qlo, qhi) = padding
        pad = (POINTWISE_PAD if self.biased else 0) if self.pointwise else INVALID
        rows, rkeys = self.rows.conv(kh, sh, plo, phi, pad)
        cols, ckeys = self.cols.conv(kw, sw, qlo, qhi, pad)
        g, mode = _compose_groups(self.cin, self.cout, self.groups, cout, groups)
        pointwise = (self.pointwise and (kh, kw, sh, sw) == (1, 1, 1, 1)
                     and (plo, phi, qlo, qhi) == (0, 0, 0, 0))
        full = (0, self.rows.extent - 1, 0, self.cols.extent - 1)
        deltas = {}
        for r, rk in enumerate(rkeys):
            for c, ck in enumerate(ckeys):
                box = None
                for b, rr in enumerate(rk):
                    for d, cc in enumerate(ck):
                        # a dropped path removes the whole interior part of that tap
                        src = (full if INVALID in (rr, cc)
                               else self.deltas[(_linear(rr), _linear(cc))])
                        box = _union(box, _shift(src, b * self.rows.stride, d * self.cols.stride))
                deltas[(r, c)] = box
        kernels = biases = None
        if w is not None and self.kernels is not None:
            kernels = self._conv_kernels(w, rkeys, ckeys, deltas, rows.extent, cols.extent,
                                         groups, mode, g)
            biases = self._conv_biases(w, rkeys, ckeys, groups,
                                       np.zeros(cout) if bias is None else bias)
        # the interior's products with every tap, and one per tap of each border pair
        temporaries = (8 * self._distinct_kernels() * self.rows.extent * self.cols.extent
                       * (self.cin // g) * kh * kw * cout)
        new = SpatialMap(rows, cols, self.cin, cout, g, pointwise, kernels, biases, deltas)
        new.peak_bytes = max(self.peak_bytes, self.kernel_bytes() + temporaries + new.kernel_bytes())
        new.biased = self.biased or has_bias
        return new

    def _conv_kernels(self, w, rkeys, ckeys, deltas, ext_h, ext_w, groups, mode, g) -> dict:
        """Kernel of every new class pair: the sum over its valid taps of (this map's kernel
        for the class the tap reads) x (the tap), shifted to the tap's place. Border
        pairs are built from the interior one by changing only the taps that differ; a
        pair whose kernel cannot differ (`deltas` None) shares the interior's."""
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
                if deltas[(r, c)] is None:
                    kernels[(r, c)] = interior
                    continue
                acc = interior.copy()
                for b, rr in enumerate(rk):
                    for d, cc in enumerate(ck):
                        x, y = _linear(rr), _linear(cc)
                        if INVALID not in (rr, cc) and self.deltas[(x, y)] is None:
                            continue  # the pair read shares the interior's kernel
                        shift_add(acc, part(0, 0, b, d), b, d, -1.0)
                        if INVALID not in (rr, cc):
                            shift_add(acc, part(x, y, b, d), b, d, 1.0)
                kernels[(r, c)] = acc
        return kernels

    def _conv_biases(self, w, rkeys, ckeys, groups: int, bias: np.ndarray) -> dict:
        """Bias of every new class pair: the conv's own plus this map's bias of the class
        each tap reads through that tap; a tap on padding reads zero."""
        taps = {pair: _bias_taps(b, w, groups) for pair, b in self.biases.items()}
        out = {}
        for r, rk in enumerate(rkeys):
            for c, ck in enumerate(ckeys):
                acc = np.array(bias, np.float64)
                for b, rr in enumerate(rk):
                    for d, cc in enumerate(ck):
                        if rr >= 0 and cc >= 0:
                            acc += taps[(rr, cc)][b, d]
                out[(r, c)] = acc
        return out

    def channelwise(self, scale: np.ndarray | None, shift: np.ndarray | None) -> "SpatialMap":
        """This map followed by a per-channel scale and shift (an eval-mode BatchNorm)."""
        w = None if scale is None else np.asarray(scale, np.float64).reshape(1, 1, 1, -1)
        b = None if shift is None else np.asarray(shift, np.float64)
        return self.conv(w, (1, 1), (1, 1), ((0, 0), (0, 0)), self.cout, self.cout, True, b)

    def add(self, other: "SpatialMap") -> "SpatialMap":
        if self.cout != other.cout or self.cin != other.cin:
            raise NotFusable(f"a residual sum of {self.cout} and {other.cout} channels")
        rows, rkeys, (ra, rb) = self.rows.add(other.rows)
        cols, ckeys, (ca, cb) = self.cols.add(other.cols)
        g = math.gcd(self.groups, other.groups)
        deltas = {(r, c): _union(_shift(self.deltas[(r1, c1)], ra, ca),
                                 _shift(other.deltas[(r2, c2)], rb, cb))
                  for r, (r1, r2) in enumerate(rkeys) for c, (c1, c2) in enumerate(ckeys)}
        kernels = biases = None
        if self.kernels is not None and other.kernels is not None:
            kernels, biases = {}, {}
            for r, (r1, r2) in enumerate(rkeys):
                for c, (c1, c2) in enumerate(ckeys):
                    biases[(r, c)] = self.biases[(r1, c1)] + other.biases[(r2, c2)]
                    if (r, c) != (0, 0) and deltas[(r, c)] is None:
                        continue  # shares the interior's, filled in below
                    acc = np.zeros((rows.extent, cols.extent, self.cin // g, self.cout))
                    for m, (x, y), (dr, dc) in ((self, (r1, c1), (ra, ca)),
                                                (other, (r2, c2), (rb, cb))):
                        k = regroup(m.kernels[(x, y)], m.groups, g)
                        acc[dr:dr + k.shape[0], dc:dc + k.shape[1]] += k
                    kernels[(r, c)] = acc
            for pair in deltas:
                kernels.setdefault(pair, kernels[(0, 0)])
        new = SpatialMap(rows, cols, self.cin, self.cout, g,
                         self.pointwise and other.pointwise, kernels, biases, deltas)
        new.peak_bytes = max(self.peak_bytes, other.peak_bytes,
                             self.kernel_bytes() + other.kernel_bytes() + new.kernel_bytes())
        new.biased = self.biased or other.biased
        return new

    def _distinct_kernels(self) -> int:
        """How many kernels the pairs hold: the interior's, which every pair whose kernel
        cannot differ shares, and one per other pair."""
        return 1 + sum(box is not None for pair, box in self.deltas.items() if pair != (0, 0))

    def kernel_bytes(self) -> int:
        """Memory the exact composition of this map holds (float64 kernels, the interior's
        shared by every pair whose kernel cannot differ)."""
        return (8 * self._distinct_kernels() * self.rows.extent * self.cols.extent
                * (self.cin // self.groups) * self.cout)


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
