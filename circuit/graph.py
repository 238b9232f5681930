"""The circuit as data: a ``networkx.DiGraph`` of path-patching effects into the probe.

Nodes: ``"embed"``, every attention head ``"L.H"`` up to the probe's layer, every MLP ``"mlpL"``, and
``"probe"``. Edges: ``head → probe`` (``via="direct"``, from direct-path patching), ``head → head`` (``via`` is
the receiver's ``"q"``, ``"k"`` or ``"v"`` input, from sender→receiver path patching), ``mlpL → probe``
(``via="direct"``, from patching the whole MLP output) and ``embed → head`` (``via="input"``, effect = the
head's total activation-patching effect when known, else its direct effect: what reaches the head from the
prompt). Each edge carries ``effect`` (signed, normalised: 1 = the whole clean-vs-corrupted difference),
``method``, ``metric`` and ``n_prompts``. Head nodes carry their attention-role scores as flat scalar
attributes (``role_to_anchor``, ``role_counter_score``, ...) and a ``role`` label, so every export format
keeps them.
"""

from __future__ import annotations

from typing import Any

import networkx as nx
import numpy as np

from patching.results import EffectResult
from patching.roles import HeadRoles

FORMAT = "wordpos.circuit/1"


def head_name(layer: int, head: int) -> str:
    return f"{layer}.{head}"


def build_graph(direct: EffectResult, edges: EffectResult | None = None, roles: HeadRoles | None = None,
                mlp: EffectResult | None = None, *, model: str, probe_layer: int, metric: str, n_prompts: int,
                n_heads: int, total: EffectResult | None = None) -> nx.DiGraph:
    """Assemble the full (unpruned) graph from path-patching results (see the module docstring)."""
    d = direct.head_effects()
    G = nx.DiGraph(wordpos_format=FORMAT, model=model, probe_layer=int(probe_layer), metric=metric,
                   n_prompts=int(n_prompts))
    G.add_node("embed", kind="embed", layer=-1, head=-1, label="embed")
    G.add_node("probe", kind="probe", layer=int(probe_layer) + 1, head=-1, label=f"probe (layer {probe_layer})")
    common = dict(metric=metric, n_prompts=int(n_prompts))
    tot = total.head_effects() if total is not None else None
    for L in range(min(d.shape[0], probe_layer + 1)):
        for h in range(n_heads):
            name = head_name(L, h)
            attrs: dict[str, Any] = dict(kind="head", layer=L, head=h, label=name, direct_effect=float(d[L, h]))
            if roles is not None:
                for k, v in roles.head(L, h).items():
                    attrs[f"role_{k}"] = v
                attrs["role"] = roles.label(L, h)
            G.add_node(name, **attrs)
            G.add_edge(name, "probe", effect=float(d[L, h]), via="direct", method=direct.method, **common)
            inflow = float(tot[L, h]) if tot is not None else float(d[L, h])
            G.add_edge("embed", name, effect=inflow, via="input",
                       method=total.method if total is not None else direct.method, **common)
    if mlp is not None:
        for L, v in enumerate(np.asarray(mlp.effects).reshape(-1)[: probe_layer + 1]):
            G.add_node(f"mlp{L}", kind="mlp", layer=L, head=-1, label=f"MLP {L}")
            G.add_edge(f"mlp{L}", "probe", effect=float(v), via="direct", method=mlp.method, **common)
    if edges is not None:
        e = np.asarray(edges.effects)
        vias = edges.coords.get("via", ["q", "k", "v"])
        for sL, sH, rL, rH, w in zip(*np.nonzero(np.isfinite(e))):
            s, r = head_name(int(sL), int(sH)), head_name(int(rL), int(rH))
            if s not in G or r not in G:
                continue
            value = float(e[sL, sH, rL, rH, w])
            key = (s, r)
            # a DiGraph holds one edge per pair: keep the strongest of q/k/v and record all three
            prev = G.edges[key] if G.has_edge(*key) else None
            attrs = {f"effect_{vias[w]}": value}
            if prev is None or abs(value) > abs(prev["effect"]):
                attrs.update(effect=value, via=str(vias[w]), method=edges.method, **common)
            G.add_edge(s, r, **attrs)
    return G


def probe_inflow(G: nx.DiGraph) -> float:
    """Total |effect| on edges into the probe."""
    return float(sum(abs(d["effect"]) for _, _, d in G.in_edges("probe", data=True)))


def graph_to_dict(G: nx.DiGraph) -> dict[str, Any]:
    """A plain JSON-able node-link dict."""
    return nx.node_link_data(G, edges="edges")


def graph_from_dict(d: dict[str, Any]) -> nx.DiGraph:
    return nx.node_link_graph(d, directed=True, edges="edges")
