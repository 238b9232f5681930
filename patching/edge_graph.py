"""The edge-level computational graph up to the probe's layer, and edge scores held in dense tensors.

Writers (rows): ``"input"`` (the residual entering layer 0: token + position embeddings), ``"a{L}.h{H}"``
(head H's output ``z_h @ W_O[h]``, no bias), ``"m{L}"`` (MLP L's output), for every layer up to and including
the probe's. Readers (columns): ``"a{L}.h{H}<q>"`` per query head, ``"a{L}.h{J}<k>"`` / ``"a{L}.h{J}<v>"`` per
key/value head J (grouped-query attention has ``n_kv_heads`` of them per layer), ``"m{L}"`` (the MLP's input)
and ``"probe"`` (the residual stream the probe reads, ``resid_post`` of the probe layer).

An edge (w, r) exists iff w writes before r reads: w's layer < r's layer, or the same layer with w a head and
r the MLP; ``input`` feeds every reader and every writer feeds ``probe``. In blocks that run attention and the MLP
in parallel on the same input (``parallel_attn_mlp``: GPT-NeoX/Pythia, GPT-J, Phi, Falcon, ...) a layer's MLP does
not read that layer's heads, so those edges do not exist (as in TransformerLens' own edge graph). Names are MIB
style (``"w->r"``) and map one-to-one onto :meth:`EdgeGraph.to_networkx`, whose nodes are the writers and the
readers (each reader node carries the ``component`` it belongs to: ``"a1.h1<v>"`` -> ``"a1.h1"``; with GQA
``"a3.h1<k>"`` -> ``"a3.kv1"``, with ``heads`` listing the query heads that share it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from wordpos.probing.engines.base import ModelDims
from wordpos.probing.errors import ConfigError, CorruptFileError
from wordpos.probing.reprs import clipped, short_repr

ReaderKind = Literal["q", "k", "v", "mlp", "probe"]
METHODS: tuple[str, ...] = ("eap", "eap-ig", "exact")

_HEAD_RE = re.compile(r"^a(\d+)\.h(\d+)$")
_READER_RE = re.compile(r"^a(\d+)\.h(\d+)<([qkv])>$")
_MLP_RE = re.compile(r"^m(\d+)$")


def node_layer(name: str) -> int:
    """Layer of a writer or reader name; ``input`` is -1 and ``probe`` is +inf-like (10**9)."""
    if name == "input":
        return -1
    if name == "probe":
        return 10**9
    for rx in (_HEAD_RE, _READER_RE, _MLP_RE):
        m = rx.match(name)
        if m:
            return int(m.group(1))
    raise ConfigError(f"{name!r} is not a graph node name: use 'input', 'a{{L}}.h{{H}}', 'a{{L}}.h{{H}}<q|k|v>', "
                      "'m{L}' or 'probe'.")


@dataclass
class EdgeGraph:
    """Writers × readers of one model up to ``probe_layer``; ``valid[w, r]`` marks the edges that exist."""

    writers: list[str]
    readers: list[str]
    valid: Bool[Tensor, "n_writers n_readers"]
    n_layers: int
    n_heads: int
    n_kv_heads: int
    probe_layer: int
    parallel_attn_mlp: bool = False
    _w_index: dict[str, int] = field(init=False, repr=False, compare=False)
    _r_index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.valid = torch.as_tensor(self.valid, dtype=torch.bool)
        if tuple(self.valid.shape) != (len(self.writers), len(self.readers)):
            raise ConfigError(f"valid has shape {tuple(self.valid.shape)} but the graph has {len(self.writers)} "
                              f"writers and {len(self.readers)} readers; build it with EdgeGraph.for_model.")
        if self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}.")
        if not 0 <= self.probe_layer < self.n_layers:
            raise ConfigError(f"probe_layer {self.probe_layer} is out of range 0..{self.n_layers - 1}.")
        self._w_index = {w: i for i, w in enumerate(self.writers)}
        self._r_index = {r: i for i, r in enumerate(self.readers)}

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, n_layers: int, n_heads: int, n_kv_heads: int, probe_layer: int, *,
              parallel_attn_mlp: bool = False) -> "EdgeGraph":
        """The graph of a model with these sizes (see the module docstring for the edge rule)."""
        if not 0 <= probe_layer < n_layers:
            raise ConfigError(f"probe_layer {probe_layer} is out of range: the model has {n_layers} layers "
                              f"(0..{n_layers - 1}).")
        writers = ["input"]
        readers: list[str] = []
        w_layer, r_layer, w_head, r_mlp = [-1], [], [False], []
        for L in range(probe_layer + 1):
            for h in range(n_heads):
                writers.append(f"a{L}.h{h}")
                w_layer.append(L)
                w_head.append(True)
            writers.append(f"m{L}")
            w_layer.append(L)
            w_head.append(False)
            for letter, n in (("q", n_heads), ("k", n_kv_heads), ("v", n_kv_heads)):
                for h in range(n):
                    readers.append(f"a{L}.h{h}<{letter}>")
                    r_layer.append(L)
                    r_mlp.append(False)
            readers.append(f"m{L}")
            r_layer.append(L)
            r_mlp.append(True)
        readers.append("probe")
        r_layer.append(probe_layer + 1)
        r_mlp.append(False)
        wl = torch.tensor(w_layer)[:, None]
        rl = torch.tensor(r_layer)[None, :]
        valid = wl < rl
        if not parallel_attn_mlp:  # a layer's heads write before its MLP reads
            valid |= (wl == rl) & torch.tensor(w_head)[:, None] & torch.tensor(r_mlp)[None, :]
        return cls(writers, readers, valid, n_layers, n_heads, n_kv_heads, probe_layer, bool(parallel_attn_mlp))

    @classmethod
    def for_model(cls, dims: ModelDims, probe_layer: int) -> "EdgeGraph":
        return cls.build(dims.n_layers, dims.n_heads, dims.n_kv_heads, probe_layer,
                         parallel_attn_mlp=dims.parallel_attn_mlp)

    # ------------------------------------------------------------------ lookups
    def __repr__(self) -> str:
        return short_repr(self, [f"{self.n_writers} writers × {self.n_readers} readers, {self.n_edges} edges",
                                 f"{self.n_layers} layers of {self.n_heads} heads ({self.n_kv_heads} key/value heads)",
                                 f"probe after layer {self.probe_layer}"])

    @property
    def n_writers(self) -> int:
        return len(self.writers)

    @property
    def n_readers(self) -> int:
        return len(self.readers)

    @property
    def n_edges(self) -> int:
        return int(self.valid.sum())

    @property
    def group_size(self) -> int:
        """Query heads per key/value head."""
        return self.n_heads // self.n_kv_heads

    def writer_index(self, w: str) -> int:
        try:
            return self._w_index[w]
        except KeyError:
            raise ConfigError(f"{w!r} is not a writer of this graph (writers: 'input', 'a{{L}}.h{{H}}', 'm{{L}}' for "
                              f"L <= {self.probe_layer}).") from None

    def reader_index(self, r: str) -> int:
        try:
            return self._r_index[r]
        except KeyError:
            raise ConfigError(f"{r!r} is not a reader of this graph (readers: 'a{{L}}.h{{H}}<q|k|v>' (k/v per kv head "
                              f"0..{self.n_kv_heads - 1}), 'm{{L}}', 'probe', for L <= {self.probe_layer}).") from None

    def edge(self, name: str) -> tuple[int, int]:
        """``(w_idx, r_idx)`` of ``"w->r"``; raises if the edge does not exist."""
        if "->" not in name:
            raise ConfigError(f"edge names look like 'a0.h2->a1.h1<v>', got {name!r}.")
        w, r = name.split("->", 1)
        i, j = self.writer_index(w), self.reader_index(r)
        if not self.valid[i, j]:
            raise ConfigError(f"{name!r} is not an edge: {w} does not write before {r} reads.")
        return i, j

    def edge_index(self) -> tuple[Tensor, Tensor]:
        """LongTensors ``(w_idx, r_idx)`` of the valid edges, row-major (the order of :meth:`edge_names`)."""
        w, r = self.valid.nonzero(as_tuple=True)
        return w, r

    def edge_names(self) -> list[str]:
        w, r = self.edge_index()
        return [f"{self.writers[i]}->{self.readers[j]}" for i, j in zip(w.tolist(), r.tolist())]

    def reader_kind(self, r: str | int) -> ReaderKind:
        name = self.readers[r] if isinstance(r, int) else r
        if name == "probe":
            return "probe"
        if _MLP_RE.match(name):
            return "mlp"
        m = _READER_RE.match(name)
        if not m:
            raise ConfigError(f"{name!r} is not a reader name.")
        return m.group(3)  # type: ignore[return-value]

    def reader_component(self, r: str) -> str:
        """The head/MLP node a reader belongs to (``a1.h1<v>`` -> ``a1.h1``; GQA k/v -> ``a{L}.kv{J}``)."""
        kind = self.reader_kind(r)
        if kind in ("mlp", "probe"):
            return r
        m = _READER_RE.match(r)
        assert m
        if kind in ("k", "v") and self.n_kv_heads != self.n_heads:
            return f"a{m.group(1)}.kv{m.group(2)}"
        return f"a{m.group(1)}.h{m.group(2)}"

    def reader_heads(self, r: str) -> list[str]:
        """The query heads whose computation a reader feeds (one, or a GQA group for k/v)."""
        kind = self.reader_kind(r)
        if kind in ("mlp", "probe"):
            return []
        m = _READER_RE.match(r)
        assert m
        L, h = int(m.group(1)), int(m.group(2))
        if kind == "q" or self.n_kv_heads == self.n_heads:
            return [f"a{L}.h{h}"]
        g = self.group_size
        return [f"a{L}.h{q}" for q in range(h * g, (h + 1) * g)]

    def readers_of(self, layer: int, kind: ReaderKind) -> list[int]:
        """Reader indices of one kind at one layer, in head order (``probe`` ignores ``layer``)."""
        if kind == "probe":
            return [self.n_readers - 1]
        if kind == "mlp":
            return [self.reader_index(f"m{layer}")]
        n = self.n_heads if kind == "q" else self.n_kv_heads
        return [self.reader_index(f"a{layer}.h{h}<{kind}>") for h in range(n)]

    def writers_of(self, layer: int) -> tuple[list[int], int]:
        """``(head writer indices, mlp writer index)`` at ``layer``."""
        return [self.writer_index(f"a{layer}.h{h}") for h in range(self.n_heads)], self.writer_index(f"m{layer}")

    # ------------------------------------------------------------------ masks
    def full_mask(self) -> Bool[Tensor, "n_writers n_readers"]:
        return self.valid.clone()

    def empty_mask(self) -> Bool[Tensor, "n_writers n_readers"]:
        return torch.zeros_like(self.valid)

    def mask_from_edges(self, edges: list[str]) -> Bool[Tensor, "n_writers n_readers"]:
        m = self.empty_mask()
        for e in edges:
            m[self.edge(e)] = True
        return m

    def check_mask(self, masks: Tensor) -> Bool[Tensor, "n_circuits n_writers n_readers"]:
        """Masks as ``[n_circuits, n_writers, n_readers]`` bool (a single ``[W, R]`` mask gets a circuit axis)."""
        masks = torch.as_tensor(masks)
        if masks.dim() == 2:
            masks = masks[None]
        if masks.dim() != 3 or tuple(masks.shape[1:]) != (self.n_writers, self.n_readers):
            raise ConfigError(f"masks must be [n_circuits, {self.n_writers}, {self.n_readers}] (writers × readers of "
                              f"this graph), got {tuple(masks.shape)}.")
        return masks.to(torch.bool)

    # ------------------------------------------------------------------ export
    def to_dict(self) -> dict[str, Any]:
        return {"n_layers": self.n_layers, "n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads,
                "probe_layer": self.probe_layer, "parallel_attn_mlp": self.parallel_attn_mlp}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EdgeGraph":
        return cls.build(int(d["n_layers"]), int(d["n_heads"]), int(d["n_kv_heads"]), int(d["probe_layer"]),
                         parallel_attn_mlp=bool(d.get("parallel_attn_mlp", False)))

    def node_attrs(self, name: str, role: Literal["writer", "reader"]) -> dict[str, Any]:
        """Attributes of a writer or reader node (role, kind, layer, component; readers also ``heads``)."""
        if role == "writer":
            self.writer_index(name)
            kind = "input" if name == "input" else ("mlp" if _MLP_RE.match(name) else "head")
            return {"role": "writer", "kind": kind, "layer": node_layer(name), "component": name}
        self.reader_index(name)
        kind = self.reader_kind(name)
        return {"role": "reader", "kind": kind, "layer": node_layer(name) if kind != "probe" else self.probe_layer + 1,
                "component": self.reader_component(name), "heads": self.reader_heads(name)}

    def to_networkx(self, scores: Tensor | None = None, mask: Tensor | None = None, *, in_graph_only: bool = False):
        """A ``networkx.DiGraph`` with one edge per valid edge (same names). Writer nodes are keyed by writer
        name; reader nodes by reader name (``m{L}`` is both MLP L's writer and reader name, so its reader node is
        ``"m{L}<in>"``). Edge attributes: ``score`` (NaN if none), ``reader`` (q/k/v/mlp/probe), ``in_graph``.
        ``in_graph_only`` keeps only the edges ``mask`` holds and the nodes they touch (same order as the whole
        graph's), without building the rest."""
        import networkx as nx

        g = nx.DiGraph()
        wi, rj = self.edge_index()
        mk_t = None if mask is None else torch.as_tensor(mask, dtype=torch.bool).cpu()[wi, rj]
        if in_graph_only and mk_t is not None:
            wi, rj, mk_t = wi[mk_t], rj[mk_t], mk_t[mk_t]
        used_w = set(wi.tolist()) if in_graph_only else range(len(self.writers))
        used_r = set(rj.tolist()) if in_graph_only else range(len(self.readers))
        for i, w in enumerate(self.writers):
            if i in used_w:
                g.add_node(w, **self.node_attrs(w, "writer"))
        rnode = {r: (f"{r}<in>" if _MLP_RE.match(r) else r) for r in self.readers}
        for j, r in enumerate(self.readers):
            if j in used_r:
                g.add_node(rnode[r], name=r, **self.node_attrs(r, "reader"))
        # per-edge values read out in one go (indexing a tensor per edge costs ~10 µs each on 30k edges)
        sc = [float("nan")] * len(wi) if scores is None else \
            torch.as_tensor(scores, dtype=torch.float64)[wi, rj].tolist()
        mk = [True] * len(wi) if mk_t is None else mk_t.tolist()
        kind = {r: self.reader_kind(r) for r in self.readers}
        for i, j, s, m in zip(wi.tolist(), rj.tolist(), sc, mk):
            w, r = self.writers[i], self.readers[j]
            g.add_edge(w, rnode[r], name=f"{w}->{r}", reader=kind[r], score=s, in_graph=m)
        return g


@dataclass
class EdgeScores:
    """Scores of every edge: ``scores[w, r]`` (NaN where the edge does not exist). Sign convention: the score
    estimates ``m(N without edge) − m(N)`` in normalised metric units (negative = the edge carries the effect);
    rank edges by ``|score|``."""

    graph: EdgeGraph
    scores: Float[Tensor, "n_writers n_readers"]
    method: str
    metric: str
    n_pairs: int
    config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.scores = torch.as_tensor(self.scores, dtype=torch.float64).clone()
        if tuple(self.scores.shape) != tuple(self.graph.valid.shape):
            raise ConfigError(f"scores have shape {tuple(self.scores.shape)}, the graph is "
                              f"{tuple(self.graph.valid.shape)} (writers × readers).")
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}, got {self.method!r}.")
        self.scores[~self.graph.valid] = float("nan")

    def __repr__(self) -> str:
        return short_repr(self, [f"{self.method} on {self.metric}", f"{self.graph.n_edges} edges",
                                 f"{self.n_pairs} pairs", "largest |score|: " + clipped(
                                     (f"{e} {v:+.3g}" for e, v in self.top_edges(3) if v == v), 3) or "none scored"])

    def edge_values(self) -> Float[Tensor, " n_edges"]:
        """Scores of the valid edges in :meth:`EdgeGraph.edge_names` order."""
        w, r = self.graph.edge_index()
        return self.scores[w, r]

    def top_edges(self, k: int, *, absolute: bool = True) -> list[tuple[str, float]]:
        """The ``k`` edges with the largest ``|score|`` (or signed score with ``absolute=False``)."""
        vals = self.edge_values()
        key = vals.abs() if absolute else vals
        key = torch.nan_to_num(key, nan=-float("inf"))
        order = torch.argsort(key, descending=True, stable=True)[: max(0, int(k))]
        names = self.graph.edge_names()
        return [(names[i], float(vals[i])) for i in order.tolist()]

    def top_mask(self, k: int, *, absolute: bool = True) -> Bool[Tensor, "n_writers n_readers"]:
        """The mask holding the ``k`` top edges."""
        vals = self.edge_values()
        key = torch.nan_to_num(vals.abs() if absolute else vals, nan=-float("inf"))
        order = torch.argsort(key, descending=True, stable=True)[: max(0, int(k))]
        w, r = self.graph.edge_index()
        m = self.graph.empty_mask()
        m[w[order], r[order]] = True
        return m

    def to_dict(self) -> dict[str, Any]:
        return {"graph": self.graph.to_dict(), "method": self.method, "metric": self.metric, "n_pairs": self.n_pairs,
                "config": self.config}

    def save(self, directory: str | Path) -> Path:
        """``edge_scores.npz`` (the dense tensor) and ``edge_scores.json`` (graph, method, config), atomically."""
        from wordpos.probing.io import write_json, write_npz

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        write_npz(d / "edge_scores.npz", scores=self.scores.numpy())
        write_json(d / "edge_scores.json", self.to_dict())
        return d

    @classmethod
    def load(cls, directory: str | Path) -> "EdgeScores":
        """Read scores written by :meth:`save`."""
        from wordpos.probing.io import read_json, read_npz

        d = Path(directory)
        meta = read_json(d / "edge_scores.json", "edge score metadata")
        arr = read_npz(d / "edge_scores.npz", "edge scores")
        try:
            graph = EdgeGraph.from_dict(meta["graph"])
            return cls(graph, torch.from_numpy(arr["scores"]), meta["method"], meta["metric"], int(meta["n_pairs"]),
                       meta.get("config", {}))
        except (KeyError, ConfigError) as e:
            raise CorruptFileError(f"{d} does not hold edge scores written by EdgeScores.save ({e}); re-run the "
                                   "scoring step.") from e

    def to_mib_json(self, mask: Tensor | None = None) -> dict[str, Any]:
        """MIB-style ``{"edges": {"w->r": {"score", "in_graph"}}, "nodes": {name: {"in_graph"}}}``. ``in_graph``
        follows ``mask`` (default: every edge). A node is in the graph when an in-graph edge touches it."""
        mk = self.graph.full_mask() if mask is None else torch.as_tensor(mask, dtype=torch.bool).cpu() & self.graph.valid
        w, r = self.graph.edge_index()
        W, R = self.graph.writers, self.graph.readers
        edges = {f"{W[i]}->{R[j]}": {"score": s, "in_graph": ig}
                 for i, j, s, ig in zip(w.tolist(), r.tolist(), self.scores[w, r].tolist(), mk[w, r].tolist())}
        touched = {W[i] for i in mk.any(1).nonzero().flatten().tolist()}
        for j in mk.any(0).nonzero().flatten().tolist():
            touched.update(self.graph.reader_heads(R[j]) or [self.graph.reader_component(R[j])])
        nodes = {n: {"in_graph": n in touched} for n in self.graph.writers + ["probe"]}
        return {"edges": edges, "nodes": nodes, "method": self.method, "metric": self.metric}


__all__ = ["EdgeGraph", "EdgeScores", "METHODS", "ReaderKind", "node_layer"]
