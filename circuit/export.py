"""Saving and loading circuit graphs: node-link JSON, GraphML, GEXF and Graphviz DOT, chosen by the suffix
(``.json``, ``.graphml``, ``.gexf``, ``.dot``).

Every format round-trips to an equal graph: same nodes, edges and graph/node/edge attributes, with the same
Python types. Attributes are flat scalars by construction (:mod:`circuit.graph`: role scores are
``role_<name>`` floats); GraphML and GEXF refuse anything else (``ConfigError`` naming the attribute).

* **JSON**: networkx node-link data (``{"graph", "nodes", "edges"}``), the form a run directory keeps.
* **GraphML**: networkx's (xml) writer's bytes (typed keys), written in one pass (:mod:`circuit.xml_writers`).
* **GEXF**: networkx's writer's bytes, likewise; GEXF has no graph attributes, so they travel as JSON in
  ``<meta><description>``.
* **DOT**: written and read here (no pydot / pygraphviz). It is plain Graphviz (``dot -Tsvg graph.dot`` draws it:
  layers as ranks, coloured edges whose pen width follows |effect| (edge graphs: |score|, coloured by reader));
  every value is a quoted string and the graph attribute ``wordpos_types`` (JSON) gives each data attribute's type
  per scope (``str``, ``int``, ``float``, ``bool``, or ``json`` for anything else). Attributes not listed there
  (``rankdir``, ``fillcolor``, ``color``, ``penwidth``, the ``rank=same`` groups) are presentation and are dropped
  on load. The reader reads this writer's format only.

Edge-level graphs (:func:`edge_graph_networkx`, :func:`save_edge_graph`) use the same formats: writer and reader
nodes of :class:`~patching.edge_graph.EdgeGraph`, each edge with ``name`` ("w->r"), ``reader`` (q/k/v/mlp/probe),
``score`` and ``in_graph``; :func:`save_mib_json` writes MIB's circuit JSON.

Writes are atomic (:func:`probing.io.atomic_path`). Loading a file that is truncated, not in the format its
suffix says, or not a wordpos circuit graph (graph attribute ``wordpos_format``) raises ``CorruptFileError``.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import networkx as nx

from wordpos.circuit.graph import FORMAT, graph_from_dict, graph_to_dict
from wordpos.circuit.xml_writers import write_gexf, write_graphml
from wordpos.probing.errors import ConfigError, CorruptFileError
from wordpos.probing.io import atomic_path

FORMATS = (".json", ".graphml", ".gexf", ".dot")
SCALARS = (str, int, float, bool)


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise ConfigError(f"unknown graph format {suffix or path.name!r} for {path}; use one of {', '.join(FORMATS)}.")
    return suffix


def _check(G: nx.DiGraph, path: Path) -> nx.DiGraph:
    got = G.graph.get("wordpos_format")
    if got != FORMAT:
        raise CorruptFileError(f"{path} is not a wordpos circuit graph (wordpos_format is {got!r}, expected "
                               f"{FORMAT!r}); export one with `wordpos circuit` or scripts/export_circuit.py.")
    return G


def _check_scalar_attrs(G: nx.DiGraph, fmt: str) -> None:
    items = [("graph", "", G.graph)] + [("node", n, d) for n, d in G.nodes(data=True)] + \
            [("edge", f"{u} -> {v}", d) for u, v, d in G.edges(data=True)]
    for scope, where, d in items:
        for k, v in d.items():
            if type(v) not in SCALARS:
                raise ConfigError(f"{fmt} keeps only str/int/float/bool attributes, but {scope} {where} has {k}="
                                  f"{v!r} ({type(v).__name__}); flatten it into scalar attributes (as build_graph "
                                  "does for role scores) or save as .json / .dot.")
    for n in G:
        if not isinstance(n, str):
            raise ConfigError(f"node names must be strings for {fmt}; got {n!r}.")


def save_graph(G: nx.DiGraph, path: str | Path) -> Path:
    """Write ``G`` in the format its suffix names (atomically); returns the path."""
    path = Path(path)
    suffix = _suffix(path)
    if suffix in (".graphml", ".gexf"):
        _check_scalar_attrs(G, suffix[1:].upper())
    with atomic_path(path) as tmp:
        if suffix == ".json":
            # compact: json's C encoder runs only without indent (~10x faster on a circuit of thousands of edges)
            tmp.write_text(json.dumps(graph_to_dict(G)), encoding="utf-8")
        elif suffix == ".graphml":  # no pretty-printing: half the time on a circuit of thousands of edges
            with open(tmp, "wb") as fh:  # networkx's xml writer's bytes in one pass (circuit.xml_writers)
                done = write_graphml(G, fh)
            if not done:
                nx.write_graphml_xml(G, tmp, prettyprint=False)
        elif suffix == ".gexf":
            _write_gexf(G, tmp)
        else:
            tmp.write_text(to_dot(G), encoding="utf-8")
    return path


def load_graph(path: str | Path) -> nx.DiGraph:
    """Read a graph written by :func:`save_graph` (format by suffix) back into an equal ``DiGraph``."""
    path = Path(path)
    suffix = _suffix(path)
    if not path.is_file():
        raise CorruptFileError(f"{path} does not exist; write it with circuit.save_graph or scripts/export_circuit.py.")
    try:
        if suffix == ".json":
            G = graph_from_dict(json.loads(path.read_text(encoding="utf-8")))
        elif suffix == ".graphml":
            G = nx.read_graphml(path)
            G.graph.pop("node_default", None)
            G.graph.pop("edge_default", None)
        elif suffix == ".gexf":
            G = nx.read_gexf(path)
            G.graph.clear()
            G.graph.update(_gexf_get_graph_attrs(path))
            for *_, d in G.edges(data=True):
                d.pop("id", None)
        else:
            G = from_dot(path.read_text(encoding="utf-8"))
    except CorruptFileError as e:
        raise CorruptFileError(f"{path}: {e}") from e
    except Exception as e:  # XML / JSON parse errors, wrong structure, undecodable bytes
        raise CorruptFileError(f"{path} cannot be read as {suffix[1:]} ({type(e).__name__}: {str(e)[:200]}); it is "
                               "truncated or not a graph. Re-export it from the run directory "
                               "(scripts/export_circuit.py).") from e
    if isinstance(G, (nx.MultiDiGraph, nx.MultiGraph)) or not G.is_directed():
        raise CorruptFileError(f"{path} holds a {type(G).__name__}, not a wordpos circuit graph (a DiGraph).")
    return _check(nx.DiGraph(G), path)


# ---- GEXF keeps no graph attributes: carry them as JSON in <meta><description> --------------------------------
_GEXF_TAG = "wordpos-graph-attributes:"


def _write_gexf(G: nx.DiGraph, path: Path) -> None:
    """networkx's GEXF writer's bytes, with the graph attributes put into its ``<meta>`` before it writes (not parsed
    back and rewritten after: that was half the export's time on a circuit of thousands of edges), in one pass
    (:func:`circuit.xml_writers.write_gexf`) or, for a graph outside its scope, by networkx's writer itself."""
    from xml.etree.ElementTree import SubElement

    description = _GEXF_TAG + json.dumps(G.graph)
    with open(path, "wb") as fh:
        if write_gexf(G, fh, description):
            return
    writer = nx.readwrite.gexf.GEXFWriter(encoding="utf-8", prettyprint=False)
    writer.add_graph(G)
    meta = writer.xml.find("meta")
    if meta is None:  # networkx always writes one; keep the attributes if a later version does not
        meta = SubElement(writer.xml, "meta")
    SubElement(meta, "description").text = description
    with open(path, "wb") as fh:
        writer.write(fh)


def _gexf_get_graph_attrs(path: Path) -> dict[str, Any]:
    import xml.etree.ElementTree as ET

    for el in ET.parse(path).getroot().iter():
        if el.tag.endswith("description") and (el.text or "").startswith(_GEXF_TAG):
            return json.loads(el.text[len(_GEXF_TAG):])
    return {}


# ---- Graphviz DOT: plain quoted strings + a type table (wordpos_types) -----------------------------------------
_TYPES_KEY = "wordpos_types"
_HEADER = "// wordpos circuit graph: data attributes and their types are listed in wordpos_types"
_POS, _NEG = "#2166ac", "#b2182b"
_FILL = {"embed": "#bdbdbd", "input": "#bdbdbd", "probe": "#a6d96a", "head": "#fdae61", "mlp": "#abd9e9",
         "q": "#d9f0d3", "k": "#fee0b6", "v": "#d8daeb"}
_READER_COLOR = {"q": "#1b9e77", "k": "#d95f02", "v": "#7570b3", "mlp": "#e7298a", "probe": "#444444"}


def _type_of(v: Any) -> str:
    return {bool: "bool", int: "int", float: "float", str: "str"}.get(type(v), "json")


def _types(dicts: list[dict[str, Any]]) -> dict[str, str]:
    seen: dict[str, set[str]] = {}
    for d in dicts:
        for k, v in d.items():
            seen.setdefault(str(k), set()).add(_type_of(v))
    return {k: (t.pop() if len(t) == 1 else "json") for k, t in seen.items()}


def _encode(v: Any, t: str) -> str:
    if t == "json":
        return json.dumps(v)
    if t == "bool":
        return "true" if v else "false"
    if t == "float":
        return repr(float(v))
    return str(v)


def _decode(s: str, t: str) -> Any:
    if t == "json":
        return json.loads(s)
    if t == "bool":
        if s not in ("true", "false"):
            raise CorruptFileError(f"bad bool {s!r}")
        return s == "true"
    if t == "int":
        return int(s)
    if t == "float":
        return float(s)
    if t == "str":
        return s
    raise CorruptFileError(f"unknown attribute type {t!r} in {_TYPES_KEY}")


def _q(s: Any) -> str:
    s = str(s)
    if "\\" in s or '"' in s or "\n" in s or "\r" in s:  # (most names and numbers need none of it)
        s = s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{s}"'


def _attr_list(d: dict[str, Any], types: dict[str, str], extra: dict[str, Any] | None = None,
               keys: dict[Any, str] | None = None) -> str:
    """`` [k="v", ...]`` for ``d`` (typed by ``types``) and the presentation attributes ``extra``; ``keys`` caches
    the quoted keys across a graph's nodes or edges."""
    if keys is None:
        keys = {}
    items = []
    for k, v in d.items():
        qk = keys.get(k) if type(k) is str else None  # (True, 1 and 1.0 are one dict key: cache str keys only)
        if qk is None:
            qk = _q(k)
            if type(k) is str:
                keys[k] = qk
        t = types[str(k)]
        items.append(f"{qk}={_q(v if t == 'str' and type(v) is str else _encode(v, t))}")
    items += [f"{_q(k)}={_q(v)}" for k, v in (extra or {}).items() if k not in d]
    return f" [{', '.join(items)}]" if items else ""


def to_dot(G: nx.DiGraph) -> str:
    """Graphviz DOT text for ``G`` (see the module docstring); :func:`from_dot` reads it back."""
    nodes = [d for _, d in G.nodes(data=True)]
    edges = [d for *_, d in G.edges(data=True)]
    types = {"graph": _types([G.graph]), "node": _types(nodes), "edge": _types(edges)}
    graph_attrs = {**G.graph, _TYPES_KEY: json.dumps(types, sort_keys=True)}
    gtypes = {**types["graph"], _TYPES_KEY: "str"}
    key = "effect" if any("effect" in d for d in edges) else "score"  # head graphs: effect; edge graphs: score
    scale = max((abs(d[key]) for d in edges if isinstance(d.get(key), (int, float))
                 and math.isfinite(d[key])), default=0.0) or 1.0
    lines = [_HEADER, "digraph circuit {", f"  graph{_attr_list(graph_attrs, gtypes, {'rankdir': 'LR'})};",
             '  node [shape="box", style="rounded,filled"];']
    node_keys: dict[Any, str] = {}
    edge_keys: dict[Any, str] = {}
    for n, d in G.nodes(data=True):
        fill = {"fillcolor": _FILL.get(d.get("kind"), "#ffffff")}
        lines.append(f"  {_q(n)}{_attr_list(d, types['node'], fill, node_keys)};")
    for u, v, d in G.edges(data=True):
        e = d.get(key)
        extra = {}
        if isinstance(e, (int, float)) and not isinstance(e, bool) and math.isfinite(e):
            color = _READER_COLOR.get(d.get("reader"), _POS if e >= 0 else _NEG) if key == "score" else \
                (_POS if e >= 0 else _NEG)
            extra = {"color": color, "penwidth": f"{0.5 + 5.5 * abs(e) / scale:.2f}"}
        lines.append(f"  {_q(u)} -> {_q(v)}{_attr_list(d, types['edge'], extra, edge_keys)};")
    by_layer: dict[Any, list[str]] = {}
    for n, d in G.nodes(data=True):
        if d.get("kind") in ("head", "mlp"):
            by_layer.setdefault(d.get("layer"), []).append(n)
    for _, names in sorted(by_layer.items(), key=lambda kv: str(kv[0])):
        lines.append("  { rank=same; " + " ".join(f"{_q(n)};" for n in names) + " }")
    lines.append("}")
    return "\n".join(lines) + "\n"


_STR = r'"((?:[^"\\]|\\.)*)"'
_ATTR = re.compile(_STR + r"\s*=\s*" + _STR + r"\s*(?:,\s*|$)")
_NODE = re.compile(r"^" + _STR + r"(?:\s*\[(.*)\])?;$")
_EDGE = re.compile(r"^" + _STR + r"\s*->\s*" + _STR + r"(?:\s*\[(.*)\])?;$")
_GRAPH = re.compile(r"^graph\s*\[(.*)\];$")
_RANK = re.compile(r"^\{\s*rank=same;.*\}$")
_NODE_DEFAULT = re.compile(r"^node\s*\[.*\];$")


def _unq(s: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "r": "\r"}.get(m.group(1), m.group(1)), s)


def _parse_attrs(text: str | None, lineno: int) -> dict[str, str]:
    text = (text or "").strip()
    out, pos = {}, 0
    while pos < len(text):
        m = _ATTR.match(text, pos)
        if not m:
            raise CorruptFileError(f"line {lineno}: unreadable attribute list near {text[pos:pos + 60]!r}")
        out[_unq(m.group(1))] = _unq(m.group(2))
        pos = m.end()
    return out


def _typed(raw: dict[str, str], types: dict[str, str]) -> dict[str, Any]:
    return {k: _decode(v, types[k]) for k, v in raw.items() if k in types}


def from_dot(text: str) -> nx.DiGraph:
    """Read DOT text written by :func:`to_dot`; anything else raises ``CorruptFileError``."""
    lines = [(i + 1, line.strip()) for i, line in enumerate(text.splitlines())]
    lines = [(i, s) for i, s in lines if s and not s.startswith("//")]
    if not lines or not re.match(r"^digraph\b.*\{$", lines[0][1]):
        raise CorruptFileError("not a DOT digraph written by wordpos (no 'digraph ... {' header).")
    if lines[-1][1] != "}":
        raise CorruptFileError("the DOT file is truncated (no closing brace).")
    graph_raw: dict[str, str] = {}
    nodes: list[tuple[str, dict[str, str]]] = []
    edges: list[tuple[str, str, dict[str, str]]] = []
    for lineno, line in lines[1:-1]:
        if m := _GRAPH.match(line):
            graph_raw.update(_parse_attrs(m.group(1), lineno))
        elif _NODE_DEFAULT.match(line) or _RANK.match(line):
            continue
        elif m := _EDGE.match(line):
            edges.append((_unq(m.group(1)), _unq(m.group(2)), _parse_attrs(m.group(3), lineno)))
        elif m := _NODE.match(line):
            nodes.append((_unq(m.group(1)), _parse_attrs(m.group(2), lineno)))
        else:
            raise CorruptFileError(f"line {lineno} is not a statement of wordpos' DOT format: {line[:80]!r}")
    if _TYPES_KEY not in graph_raw:
        raise CorruptFileError(f"not a wordpos circuit graph (no {_TYPES_KEY} graph attribute); the DOT reader only "
                               "reads files written by circuit.save_graph.")
    try:
        types = json.loads(graph_raw.pop(_TYPES_KEY))
        G = nx.DiGraph()
        G.graph.update(_typed(graph_raw, types["graph"]))
        for n, raw in nodes:
            G.add_node(n, **_typed(raw, types["node"]))
        for u, v, raw in edges:
            G.add_edge(u, v, **_typed(raw, types["edge"]))
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptFileError(f"attribute values do not match their declared types ({type(e).__name__}: {e}).") from e
    return G


# ---- edge-level graphs (issue 13): writers × readers from patching.edge_graph ---------------------------------
EDGE_GRAPH_KIND = "edges"


def edge_graph_networkx(scores: Any, mask: Any = None, *, circuit_only: bool = False,
                        **graph_attrs: Any) -> nx.DiGraph:
    """The edge graph of :class:`~patching.edge_graph.EdgeScores` as a ``DiGraph`` that every format here keeps:
    :meth:`EdgeGraph.to_networkx` (writer nodes, reader nodes ``a{L}.h{H}<q|k|v>`` / ``m{L}<in>`` / ``probe``;
    edges with ``name`` ``"w->r"``, ``reader`` q/k/v/mlp/probe, ``score``, ``in_graph``) with list attributes
    flattened (a reader's ``heads`` → comma-joined string) and graph attributes ``wordpos_format``,
    ``graph_kind="edges"``, the score method/metric/pairs, the model sizes and ``graph_attrs``.
    ``circuit_only`` keeps only the in-graph edges (``mask``) and the nodes they touch."""
    g = scores.graph
    G = g.to_networkx(scores.scores, mask, in_graph_only=circuit_only)
    for n, d in G.nodes(data=True):
        d.setdefault("label", str(n))  # GEXF adds a label anyway: set it so every format reads back the same
        for k, v in list(d.items()):
            if isinstance(v, (list, tuple)):
                d[k] = ",".join(str(x) for x in v)
    G.graph.update(wordpos_format=FORMAT, graph_kind=EDGE_GRAPH_KIND, method=str(scores.method),
                   metric=str(scores.metric), n_prompts=int(scores.n_pairs), probe_layer=int(g.probe_layer),
                   n_layers=int(g.n_layers), n_heads=int(g.n_heads), n_kv_heads=int(g.n_kv_heads),
                   n_valid_edges=int(g.n_edges), **{k: v for k, v in graph_attrs.items() if v is not None})
    return G


def save_edge_graph(scores: Any, directory: str | Path, mask: Any = None, *, stem: str = "graph",
                    formats: tuple[str, ...] = FORMATS, circuit_only: bool = True, **graph_attrs: Any) -> list[Path]:
    """:func:`edge_graph_networkx` written as ``{stem}{suffix}`` for each format (atomically)."""
    G = edge_graph_networkx(scores, mask, circuit_only=circuit_only, **graph_attrs)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return [save_graph(G, directory / f"{stem}{suffix}") for suffix in formats]


def save_mib_json(scores: Any, path: str | Path, mask: Any = None) -> Path:
    """MIB-style circuit file (:meth:`EdgeScores.to_mib_json`): every edge name → ``{"score", "in_graph"}`` and
    every node → ``{"in_graph"}``, ``in_graph`` following ``mask``."""
    from wordpos.probing.io import write_text

    # plain str/float/bool already, and compact: json's C encoder runs only without indent (~10x faster on the
    # tens of thousands of edges a real model's graph has)
    return write_text(Path(path), json.dumps(scores.to_mib_json(mask)) + "\n")

