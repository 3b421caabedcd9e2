"""Where the linear runs of a `Net` are: single-input single-output regions.

A region `(src, dst)` is the set of nodes on paths from tensor `src` to node
`dst`; it can become one layer when every node in it is linear, every input
of a node comes from `src` or the region, and nothing outside reads a node of
the region except `dst`. An *atom* is a minimal such region after `src`
(preferring one that takes in every linear reader of `src`, so a residual
block `x -> conv -> ... -> add(., x)` is one atom). A *chain* is a maximal run
of atoms, each starting where the previous one ends: the maximal run of
linear operations between two nonlinearities, cut into the places where it
can be cut.
"""
from __future__ import annotations

import dataclasses

from models.net import INPUT, Net


@dataclasses.dataclass(frozen=True)
class Atom:
    src: str
    dst: str
    nodes: frozenset


class GraphInfo:
    def __init__(self, net: Net, cuts=frozenset()):
        # tensors kept materialized on request (a plan's cuts): no region spans one
        self.cuts = frozenset(cuts)
        self.order = [n for n, _ in net.graph]
        self.inputs = {n: tuple(ins) for n, ins in net.graph}
        self.pos = {INPUT: -1, **{n: i for i, n in enumerate(self.order)}}
        self.output = self.order[-1]
        self.kind = {n: net.layers[n].linear_kind() for n in self.order}
        self.consumers: dict[str, list[str]] = {t: [] for t in (INPUT, *self.order)}
        for n in self.order:
            for i in dict.fromkeys(self.inputs[n]):
                self.consumers[i].append(n)
        self.anc: dict[str, frozenset] = {INPUT: frozenset()}
        for n in self.order:
            acc = set()
            for i in self.inputs[n]:
                acc |= self.anc[i] | {i}
            self.anc[n] = frozenset(acc)
        # nodes reachable from a tensor through linear nodes only: where a region can end
        self.linear_reach: dict[str, frozenset] = {}
        for t in reversed((INPUT, *self.order)):
            acc = set()
            for c in self.consumers[t]:
                if self.kind[c] is not None:
                    acc |= {c} | self.linear_reach[c]
            self.linear_reach[t] = frozenset(acc)

    def region(self, src: str, dst: str, universe=None) -> frozenset | None:
        """The nodes of region (src, dst) if it is a valid single-input single-output region."""
        if dst not in self.linear_reach[src]:
            return None
        nodes = {n for n in self.linear_reach[src] if n == dst or n in self.anc[dst]}
        if universe is not None and not nodes <= universe:
            return None
        for n in nodes:
            if any(i != src and i not in nodes for i in self.inputs[n]):
                return None  # reads a tensor from outside (or a nonlinear path from src)
            if n != dst and (n == self.output or any(c not in nodes for c in self.consumers[n])):
                return None  # something outside needs an intermediate result
        return frozenset(nodes)

    def next_atom(self, src: str, universe=None, taken=frozenset()) -> Atom | None:
        """The smallest region after `src` that takes in all its linear readers, else the
        smallest region at all (then `src` stays materialized for its other readers)."""
        ok = lambda n: (universe is None or n in universe) and n not in taken  # noqa: E731
        want = {c for c in self.consumers[src] if self.kind[c] is not None and ok(c)}
        if not want:
            return None
        fallback = None
        for dst in sorted(filter(ok, self.linear_reach[src]), key=self.pos.__getitem__):
            nodes = self.region(src, dst, universe)
            if nodes is None or nodes & taken:
                continue
            if want <= nodes:
                return Atom(src, dst, nodes)
            if fallback is None:
                fallback = Atom(src, dst, nodes)
        return fallback

    def chain_from(self, src: str, universe=None, taken=frozenset(), stop: str | None = None):
        """Atoms from `src`, each starting at the previous one's end, until `stop` or no more."""
        atoms, taken = [], set(taken)
        t = src
        while t != stop:
            a = self.next_atom(t, universe, frozenset(taken))
            if a is None:
                break
            atoms.append(a)
            taken |= a.nodes
            t = a.dst
        return atoms

    def chains(self) -> list[list[Atom]]:
        """Every maximal linear run of the graph as a chain of atoms."""
        taken: set[str] = set()
        interior: set[str] = set()
        out = []
        for t in (INPUT, *self.order):
            if t in interior:
                continue
            while True:  # a tensor can feed several runs (e.g. two branches that never rejoin)
                chain = self.chain_from(t, taken=frozenset(taken))
                if not chain:
                    break
                for a in chain:
                    taken |= a.nodes
                    interior |= a.nodes - {a.dst}
                out.append(chain)
        return out

    def must_materialize(self, chain: list[Atom], k: int) -> bool:
        """Whether the tensor between atoms k-1 and k is read outside atom k, or cut on
        request (a forced cut)."""
        t = chain[k].src
        return t == self.output or t in self.cuts or any(c not in chain[k].nodes for c in self.consumers[t])

    def branches(self, atom: Atom) -> list[tuple[str, frozenset]] | None:
        """An atom ending in a sum, as its branches (input of the sum, nodes on the way);
        None when the branches share nodes (then the atom is kept node by node)."""
        seen: set[str] = set()
        out = []
        for inp in self.inputs[atom.dst]:
            nodes = frozenset() if inp == atom.src else frozenset(
                n for n in atom.nodes if n == inp or (n in self.anc[inp] and n != atom.dst))
            if nodes & seen:
                return None
            seen |= nodes
            out.append((inp, nodes))
        if seen | {atom.dst} != atom.nodes:
            return None
        return out
