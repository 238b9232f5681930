"""The circuit as data: a ``networkx.DiGraph`` of path-patching effects into the probe.

Nodes (attribute ``kind``):

* ``"embed"`` (kind ``embed``, ``layer=-1``);
* every attention head ``"L.H"`` for layers ``0..probe_layer`` (kind ``head``, ``layer``, ``head``,
  ``direct_effect``; with :class:`~patching.roles.HeadRoles` also one flat scalar ``role_<name>`` per role score,
  e.g. ``role_counter_score``, and the ``role`` label);
* every MLP ``"mlpL"`` (kind ``mlp``) when MLP effects are given (no MLP nodes otherwise);
* ``"probe"`` (kind ``probe``, ``layer=probe_layer + 1`` so it sorts after every head).

Every node has ``kind``, ``layer``, ``head`` (-1 where it is not a head) and ``label``.

Edges carry ``effect`` (signed float, normalised: 1 = the whole clean-vs-corrupted difference), ``via``,
``method``, ``metric`` and ``n_prompts``:

* ``L.H → probe``, ``via="direct"``: direct-path patching (``direct``, axes ``layer, head``);
* ``mlpL → probe``, ``via="direct"``: MLP-output patching (``mlp``, axis ``layer``; its method is whatever the
  result says, usually ``activation``, i.e. the MLP's *total* effect);
* ``S → R`` between heads, ``via`` = the receiver's input ``"q"``, ``"k"`` or ``"v"``: sender→receiver path
  patching (``edges``, axes ``sender_layer, sender_head, receiver_layer, receiver_head, via``; NaN = not
  computed). A ``DiGraph`` holds one edge per (sender, receiver): it carries the via with the largest |effect|
  as ``effect``/``via``, and every computed via separately as ``effect_q`` / ``effect_k`` / ``effect_v``;
  no receiver-input nodes are made.
* ``embed → L.H``, ``via="input"``: what reaches the head from the prompt, ``effect`` = the head's total
  (activation-patching) effect when ``total`` is given, else its direct effect. These edges are context: pruning
  never ranks them (:mod:`circuit.prune`).

Non-finite effects (NaN: not computed) make no edge. Graph attributes: ``wordpos_format`` (the format
version, checked on load), ``model``, ``probe_layer``, ``metric``, ``n_prompts``, ``n_heads``, ``direction``.
All attribute values are ``str``, ``int`` or ``float``, so every export format keeps them (:mod:`circuit.export`).
"""

from __future__ import annotations

from typing import Any

import networkx as nx
import numpy as np

from wordpos.patching.results import EffectResult
from wordpos.patching.roles import HeadRoles
from wordpos.probing.errors import ConfigError, CorruptFileError

FORMAT = "wordpos.circuit/1"
EDGE_AXES = ("sender_layer", "sender_head", "receiver_layer", "receiver_head", "via")


def head_name(layer: int, head: int) -> str:
    return f"{int(layer)}.{int(head)}"


def mlp_name(layer: int) -> str:
    return f"mlp{int(layer)}"


def _layer_values(res: EffectResult) -> np.ndarray:
    """``[layer]`` effects of an MLP result (summing any further axes, e.g. positions)."""
    if res.axes[:1] != ("layer",):
        raise ConfigError(f"MLP effects must have a leading 'layer' axis; got axes {res.axes}.")
    e = np.asarray(res.effects, dtype=np.float64)
    while e.ndim > 1:
        e = e.sum(-1)
    return e


def build_graph(direct: EffectResult, edges: EffectResult | None = None, roles: HeadRoles | None = None,
                mlp: EffectResult | None = None, *, model: str, probe_layer: int, metric: str, n_prompts: int,
                n_heads: int, total: EffectResult | None = None) -> nx.DiGraph:
    """Assemble the full (unpruned) graph from path-patching results (see the module docstring).

    ``direct``: ``[layer, head]`` direct-path effects; ``edges``: sender→receiver effects (optional);
    ``roles``: head attention roles (optional); ``mlp``: ``[layer]`` MLP effects (optional); ``total``:
    ``[layer, head]`` total effects used for ``embed → head`` edges (optional, else the direct effects)."""
    probe_layer, n_heads = int(probe_layer), int(n_heads)
    d = direct.head_effects()
    if d.shape[0] < probe_layer + 1 or d.shape[1] != n_heads:
        raise ConfigError(f"direct effects have shape {list(d.shape)} ([layer, head]) but the graph needs layers "
                          f"0..{probe_layer} with {n_heads} heads each; pass the direct-path result of this probe.")
    tot = total.head_effects() if total is not None else None
    if tot is not None and (tot.shape[0] < probe_layer + 1 or tot.shape[1] != n_heads):
        raise ConfigError(f"total effects have shape {list(tot.shape)}; expected at least [{probe_layer + 1}, "
                          f"{n_heads}].")
    if edges is not None and tuple(edges.axes) != EDGE_AXES:
        raise ConfigError(f"edge effects must have axes {EDGE_AXES}; got {tuple(edges.axes)} (use path_patch_edges).")
    G = nx.DiGraph(wordpos_format=FORMAT, model=str(model), probe_layer=probe_layer, metric=str(metric),
                   n_prompts=int(n_prompts), n_heads=n_heads, direction=str(direct.direction))
    common = dict(metric=str(metric), n_prompts=int(n_prompts))
    G.add_node("embed", kind="embed", layer=-1, head=-1, label="embed")
    for L in range(probe_layer + 1):
        for h in range(n_heads):
            attrs: dict[str, Any] = dict(kind="head", layer=L, head=h, label=head_name(L, h),
                                         direct_effect=float(d[L, h]))
            if roles is not None:
                for k, v in roles.head(L, h).items():
                    attrs[f"role_{k}"] = float(v)
                attrs["role"] = str(roles.label(L, h))
            G.add_node(head_name(L, h), **attrs)
    if mlp is not None:
        values = _layer_values(mlp)
        layers = [int(x) for x in mlp.coords.get("layer", range(len(values)))]
        for L, v in zip(layers, values):
            if L <= probe_layer:
                G.add_node(mlp_name(L), kind="mlp", layer=L, head=-1, label=f"MLP {L}")
    G.add_node("probe", kind="probe", layer=probe_layer + 1, head=-1, label=f"probe (layer {probe_layer})")

    for L in range(probe_layer + 1):
        for h in range(n_heads):
            name = head_name(L, h)
            if np.isfinite(d[L, h]):
                G.add_edge(name, "probe", effect=float(d[L, h]), via="direct", method=str(direct.method), **common)
            inflow = tot[L, h] if tot is not None else d[L, h]
            if np.isfinite(inflow):
                G.add_edge("embed", name, effect=float(inflow), via="input",
                           method=str(total.method if total is not None else direct.method), **common)
    if mlp is not None:
        for L, v in zip(layers, values):
            if L <= probe_layer and np.isfinite(v):
                G.add_edge(mlp_name(L), "probe", effect=float(v), via="direct", method=str(mlp.method), **common)
    if edges is not None:
        e = np.asarray(edges.effects, dtype=np.float64)
        vias = [str(v) for v in edges.coords.get("via", ["q", "k", "v"])]
        for sL, sH, rL, rH, w in zip(*np.nonzero(np.isfinite(e))):
            s, r = head_name(sL, sH), head_name(rL, rH)
            if s not in G or r not in G or int(sL) >= int(rL):
                continue
            value = float(e[sL, sH, rL, rH, w])
            attrs = {f"effect_{vias[w]}": value}
            prev = G.edges[s, r] if G.has_edge(s, r) else None
            if prev is None or abs(value) > abs(prev["effect"]):
                attrs.update(effect=value, via=vias[w], method=str(edges.method), **common)
            G.add_edge(s, r, **attrs)
    return G


def probe_inflow(G: nx.DiGraph) -> float:
    """Total |effect| on the edges into the probe."""
    if "probe" not in G:
        return 0.0
    return float(sum(abs(float(d["effect"])) for _, _, d in G.in_edges("probe", data=True)))


def circuit_heads(G: nx.DiGraph) -> list[tuple[int, int]]:
    """``[(layer, head)]`` of the head nodes of ``G``, sorted (what :func:`circuit.faithfulness` takes)."""
    return sorted((int(d["layer"]), int(d["head"])) for _, d in G.nodes(data=True) if d.get("kind") == "head")


def graph_to_dict(G: nx.DiGraph) -> dict[str, Any]:
    """A plain JSON-able node-link dict (``{"directed", "multigraph", "graph", "nodes", "edges"}``)."""
    return nx.node_link_data(G, edges="edges")


def graph_from_dict(d: dict[str, Any]) -> nx.DiGraph:
    """Inverse of :func:`graph_to_dict`; a dict that is not a wordpos graph raises ``CorruptFileError``."""
    if not isinstance(d, dict) or not isinstance(d.get("graph"), dict) or "nodes" not in d or "edges" not in d:
        raise CorruptFileError("this is not a node-link graph dict (needs 'graph', 'nodes' and 'edges'); it is not "
                               "a wordpos circuit graph.")
    if d["graph"].get("wordpos_format") != FORMAT:
        raise CorruptFileError(f"this graph is not a wordpos circuit graph (wordpos_format is "
                               f"{d['graph'].get('wordpos_format')!r}, expected {FORMAT!r}).")
    return nx.DiGraph(nx.node_link_graph(d, directed=True, multigraph=False, edges="edges"))
