"""Pruning the graph to a circuit: pure functions (the input graph is not changed) that return a
:class:`PruneResult`.

Definitions (``|e|`` is an edge's |effect|; *ranked edges* are all edges except the ``embed → head`` context
edges, i.e. ``head → probe``, ``mlp → probe`` and ``head → head``):

* **Closure.** Every rule picks a set of ranked edges, then keeps only the part that reaches the probe: the edges
  and nodes on a directed path to ``"probe"`` using picked edges. Picked edges that do not reach the probe are
  dropped (``kept_edges`` lists only what is kept, so it can be shorter than what a rule picked).
* ``prune_threshold(G, t)``: pick the ranked edges with ``|e| ≥ t``.
* ``prune_top_k(G, k)``: pick the ``k`` ranked edges with the largest ``|e|`` (ties broken by name).
* ``prune_min_edges(G, keep)``: two stages.

  1. *Into the probe*: order the edges into the probe by decreasing ``|e|`` and take the shortest prefix whose
     ``|e|`` sum is at least ``keep`` × the total ``|e|`` into the probe: the fewest edges into the probe that
     keep that share.
  2. *Upstream*: go through the circuit's nodes from the last layer to the first; a node ``r`` that is in the
     circuit passes on ``flow(r)`` = the ``|e|`` sum of its kept out-edges, and every ``head → r`` edge with
     ``|e| ≥ (1 − keep) · flow(r)`` is kept (its sender joins the circuit). So an upstream edge stays when it
     carries at least ``1 − keep`` of what its receiver passes on; with ``keep = 1`` every upstream edge stays.

* ``kept_share`` (all rules) = the ``|e|`` sum of the kept edges into the probe / the total ``|e|`` into the
  probe; ``details["ranked_share"]`` is the same over all ranked edges.
* ``embed`` is kept, with its edges to the kept heads that have no kept head → head in-edge (where the circuit
  first reads the prompt), when there is any such head.

The pruned graph keeps the input's graph attributes plus ``prune_rule`` and ``prune_parameter``.
A rule that keeps nothing raises :class:`~probing.errors.ConfigError` naming the largest ``|e|`` available.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from wordpos.probing.errors import ConfigError


@dataclass
class PruneResult:
    """The pruned graph, the ranked edges it keeps, the rule and its parameter, the threshold the rule amounts to
    (the smallest kept |effect|) and the share of the total |effect| into the probe that is kept."""

    graph: nx.DiGraph
    kept_edges: list[tuple[str, str]]
    rule: str
    parameter: float
    threshold: float
    kept_share: float
    n_candidates: int
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def heads(self) -> list[tuple[int, int]]:
        return sorted((int(d["layer"]), int(d["head"])) for _, d in self.graph.nodes(data=True)
                      if d.get("kind") == "head")

    def describe(self) -> dict[str, Any]:
        return {"rule": self.rule, "parameter": self.parameter, "threshold": self.threshold,
                "kept_share": self.kept_share, "kept_edges": len(self.kept_edges), "candidates": self.n_candidates,
                "heads": [f"{L}.{h}" for L, h in self.heads], **self.details}


def _abs(G: nx.DiGraph, u: str, v: str) -> float:
    return abs(float(G.edges[u, v]["effect"]))


def _ranked(G: nx.DiGraph) -> list[tuple[str, str, float]]:
    """Ranked edges (all but ``embed → *``) by decreasing |effect|, ties by name."""
    if "probe" not in G:
        raise ConfigError("this graph has no 'probe' node; build it with circuit.build_graph.")
    edges = [(u, v, _abs(G, u, v)) for u, v in G.edges if u != "embed"]
    return sorted(edges, key=lambda e: (-e[2], e[0], e[1]))


def _closure(G: nx.DiGraph, picked: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The picked edges on a directed path to the probe (in the picked order)."""
    H = nx.DiGraph(picked)
    if "probe" not in H:
        return []
    alive = nx.ancestors(H, "probe") | {"probe"}
    return [(u, v) for u, v in picked if u in alive and v in alive]


def _result(G: nx.DiGraph, picked: list[tuple[str, str]], rule: str, parameter: float) -> PruneResult:
    ranked = _ranked(G)
    kept = _closure(G, picked)
    H = nx.DiGraph()
    H.graph.update(G.graph)
    for u, v in kept:
        for n in (u, v):
            if n not in H:
                H.add_node(n, **G.nodes[n])
        H.add_edge(u, v, **G.edges[u, v])
    heads = [n for n, d in H.nodes(data=True) if d.get("kind") == "head"]
    sources = [h for h in heads if not any(H.nodes[p].get("kind") == "head" for p in H.predecessors(h))]
    entry = [h for h in sources if G.has_edge("embed", h)]
    if entry:
        H.add_node("embed", **G.nodes["embed"])
        for h in entry:
            H.add_edge("embed", h, **G.edges["embed", h])
    H.graph.update(prune_rule=rule, prune_parameter=float(parameter))
    total_in = sum(_abs(G, u, "probe") for u in G.predecessors("probe"))
    kept_in = sum(_abs(G, u, v) for u, v in kept if v == "probe")
    total_ranked = sum(s for *_, s in ranked)
    kept_all = sum(_abs(G, u, v) for u, v in kept)
    threshold = min((_abs(G, u, v) for u, v in kept), default=float("nan"))
    return PruneResult(graph=H, kept_edges=kept, rule=rule, parameter=float(parameter), threshold=threshold,
                       kept_share=kept_in / total_in if total_in > 0 else float("nan"), n_candidates=len(ranked),
                       details={"ranked_share": kept_all / total_ranked if total_ranked > 0 else float("nan"),
                                "total_effect_into_probe": total_in})


def _nothing_left(G: nx.DiGraph, what: str) -> ConfigError:
    ranked = _ranked(G)
    into = [s for u, v, s in ranked if v == "probe"]
    top, top_in = (ranked[0][2] if ranked else 0.0), (into[0] if into else 0.0)
    return ConfigError(f"{what} leaves no edge that reaches the probe: the largest |effect| available is {top:.4g} "
                       f"({top_in:.4g} on an edge into the probe). Use a lower threshold (e.g. --threshold "
                       f"{top_in / 2:.3g}), --top-k, or --keep.")


def check_prune_settings(*, threshold: float | None = None, top_k: int | None = None, keep: float | None = None
                         ) -> None:
    """The pruning rules' settings (those given): what :func:`prune_threshold`, :func:`prune_top_k` and
    :func:`prune_min_edges` refuse, checkable before any stage runs (``RunConfig``)."""
    if threshold is not None and not float(threshold) >= 0:
        raise ConfigError(f"the threshold is a minimum |effect| and must be ≥ 0, got {float(threshold)}.")
    if top_k is not None and (int(top_k) != top_k or top_k < 1):
        raise ConfigError(f"top-k is a number of edges and must be at least 1, got {top_k}.")
    if keep is not None and not 0 < float(keep) <= 1:
        raise ConfigError(f"keep is a share of the total |effect| and must be in (0, 1], got {float(keep)}.")


def prune_threshold(G: nx.DiGraph, threshold: float) -> PruneResult:
    """Keep the ranked edges with |effect| ≥ ``threshold`` that reach the probe."""
    check_prune_settings(threshold=threshold)
    threshold = float(threshold)
    res = _result(G, [(u, v) for u, v, s in _ranked(G) if s >= threshold], "threshold", threshold)
    if not res.kept_edges:
        raise _nothing_left(G, f"threshold {threshold:g}")
    return res


def prune_top_k(G: nx.DiGraph, k: int) -> PruneResult:
    """Keep the ``k`` ranked edges with the largest |effect|, less those that do not reach the probe."""
    check_prune_settings(top_k=k)
    res = _result(G, [(u, v) for u, v, _ in _ranked(G)[: int(k)]], "top_k", int(k))
    if not res.kept_edges:
        raise _nothing_left(G, f"top-k {k}")
    return res


def prune_min_edges(G: nx.DiGraph, keep: float = 0.9) -> PruneResult:
    """The fewest edges into the probe that keep ``keep`` of its total |effect|, plus the upstream head → head
    edges that each carry at least ``1 - keep`` of what their receiver passes on (see the module docstring)."""
    check_prune_settings(keep=keep)
    keep = float(keep)
    ranked = _ranked(G)
    into = [(u, v, s) for u, v, s in ranked if v == "probe"]
    total = sum(s for *_, s in into)
    if total <= 0:
        raise _nothing_left(G, f"keeping {keep:.0%} of the effect into the probe")
    picked: list[tuple[str, str]] = []
    acc = 0.0
    for u, v, s in into:
        picked.append((u, v))
        acc += s
        if acc >= keep * total * (1 - 1e-12):
            break
    in_circuit = {u for u, _ in picked}
    flow = {n: 0.0 for n in in_circuit}
    for u, v in picked:
        flow[u] += _abs(G, u, v)
    # receivers from the last layer to the first: a head's in-edges come from earlier layers only
    order = sorted(in_circuit, key=lambda n: -int(G.nodes[n].get("layer", 0)))
    pending = list(order)
    while pending:
        r = pending.pop(0)
        for s in sorted(G.predecessors(r)):
            if s == "embed" or G.nodes[s].get("kind") != "head":
                continue
            e = _abs(G, s, r)
            if e > 0 and e >= (1 - keep) * flow[r]:
                picked.append((s, r))
                flow[s] = flow.get(s, 0.0) + e
                if s not in in_circuit:
                    in_circuit.add(s)
                    pending.append(s)
                    pending.sort(key=lambda n: -int(G.nodes[n].get("layer", 0)))
    res = _result(G, picked, "min_edges", keep)
    return res
