"""Pruning the graph to a circuit: pure functions that return a :class:`PruneResult`.

Scores are |effect| of edges. Every rule keeps only edges whose endpoints still lie on a path to the probe,
drops nodes left without edges, and keeps ``embed`` → head edges only for heads that stay in the circuit
(they say what enters a kept head, they are not ranked).

* ``prune_threshold(G, t)``: edges with |effect| ≥ t.
* ``prune_top_k(G, k)``: the k edges with the largest |effect|.
* ``prune_min_edges(G, keep)``: the fewest edges, taken by decreasing |effect|, whose |effect| sums to at least
  ``keep`` of the total |effect| of all ranked edges (all edges except ``embed`` → head).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from probing.errors import ConfigError


@dataclass
class PruneResult:
    graph: nx.DiGraph
    kept_edges: list[tuple[str, str]]
    rule: str
    parameter: float
    kept_share: float
    n_candidates: int
    details: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {"rule": self.rule, "parameter": self.parameter, "kept_share": self.kept_share,
                "kept_edges": len(self.kept_edges), "candidates": self.n_candidates}


def _ranked(G: nx.DiGraph) -> list[tuple[str, str, float]]:
    edges = [(u, v, abs(float(d["effect"]))) for u, v, d in G.edges(data=True) if u != "embed"]
    return sorted(edges, key=lambda e: (-e[2], e[0], e[1]))


def _subgraph(G: nx.DiGraph, chosen: list[tuple[str, str]]) -> nx.DiGraph:
    H = nx.DiGraph(**G.graph)
    H.add_node("probe", **G.nodes["probe"])
    for u, v in chosen:
        H.add_node(u, **G.nodes[u])
        H.add_node(v, **G.nodes[v])
        H.add_edge(u, v, **G.edges[u, v])
    alive = nx.ancestors(H, "probe") | {"probe"}
    H = H.subgraph(alive).copy()
    H.graph.update(G.graph)
    if G.has_node("embed"):
        heads = [n for n, d in H.nodes(data=True) if d.get("kind") == "head"]
        if heads:
            H.add_node("embed", **G.nodes["embed"])
            for h in heads:
                if G.has_edge("embed", h):
                    H.add_edge("embed", h, **G.edges["embed", h])
    return H


def _result(G: nx.DiGraph, chosen: list[tuple[str, str]], rule: str, parameter: float) -> PruneResult:
    ranked = _ranked(G)
    total = sum(s for *_, s in ranked) or 1.0
    H = _subgraph(G, chosen)
    kept = [(u, v) for u, v in chosen if H.has_edge(u, v)]
    share = sum(abs(float(G.edges[e]["effect"])) for e in kept) / total
    return PruneResult(graph=H, kept_edges=kept, rule=rule, parameter=parameter, kept_share=share,
                       n_candidates=len(ranked))


def _nothing_left(G: nx.DiGraph, what: str) -> ConfigError:
    ranked = _ranked(G)
    top = ranked[0][2] if ranked else 0.0
    return ConfigError(f"{what} leaves no edge into the probe: the largest |effect| is {top:.4g}. Use a lower "
                       "threshold (e.g. --threshold {:.3g}) or --top-k.".format(top / 2))


def prune_threshold(G: nx.DiGraph, threshold: float) -> PruneResult:
    chosen = [(u, v) for u, v, s in _ranked(G) if s >= threshold]
    res = _result(G, chosen, "threshold", threshold)
    if not res.kept_edges:
        raise _nothing_left(G, f"threshold {threshold}")
    return res


def prune_top_k(G: nx.DiGraph, k: int) -> PruneResult:
    if k < 1:
        raise ConfigError(f"top-k must be at least 1, got {k}.")
    res = _result(G, [(u, v) for u, v, _ in _ranked(G)[:k]], "top_k", k)
    if not res.kept_edges:
        raise _nothing_left(G, f"top-k {k}")
    return res


def prune_min_edges(G: nx.DiGraph, keep: float = 0.9) -> PruneResult:
    if not 0 < keep <= 1:
        raise ConfigError(f"keep must be in (0, 1], got {keep}.")
    ranked = _ranked(G)
    total = sum(s for *_, s in ranked)
    if total <= 0:
        raise _nothing_left(G, f"keeping {keep:.0%} of the effect")
    chosen, acc = [], 0.0
    for u, v, s in ranked:
        if acc >= keep * total:
            break
        chosen.append((u, v))
        acc += s
    return _result(G, chosen, "min_edges", keep)
