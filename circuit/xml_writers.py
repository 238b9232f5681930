"""GraphML and GEXF written in one pass, byte for byte what networkx's own writers write, for the graphs wordpos
saves (a directed graph with flat str/int/float/bool attributes and none of the formats' reserved ones).

networkx builds an ``ElementTree`` of the whole graph and ElementTree serialises it in Python, element by element:
for real SmolLM2-135M's edge circuit (6,216 edges, four attributes each) that was ~0.35 s of the circuit stage's
figures and exports on a CPU, more than the whole compute of the H100 benchmark's circuit stage (0.22-0.31 s).
Here each node and edge is one formatted string. The constants (namespaces, schema locations, type names, the GEXF ``<meta>``) come from networkx's writer
classes, and the escaping is ElementTree's, so the bytes agree on every version (tested against networkx's writers,
special characters included); a graph outside that scope returns ``False`` and the caller uses networkx's writer.
"""

from __future__ import annotations

from typing import IO, Any
from xml.etree import ElementTree as ET

import networkx as nx

_SCALARS = (str, int, float, bool)
# keys networkx's GEXF writer takes out of the attributes (ids, labels, weights, spells, dynamics, visuals, parents)
# or renames ("key" becomes "networkx_key")
_GEXF_NODE_RESERVED = frozenset({"id", "pid", "start", "end", "parents", "spells", "slices", "viz", "key"})
_GEXF_EDGE_RESERVED = frozenset({"id", "label", "weight", "type", "start", "end", "spells", "slices", "viz", "key"})
_GRAPH_RESERVED = frozenset({"node_default", "edge_default"})

try:  # ElementTree's own escaping, so that the bytes are its bytes on this Python
    _attr = ET._escape_attrib  # type: ignore[attr-defined]
    _text = ET._escape_cdata  # type: ignore[attr-defined]
except AttributeError:  # pragma: no cover - a Python without them: networkx's writers are used
    _attr = _text = None  # type: ignore[assignment]

_HEADER = "<?xml version='1.0' encoding='utf-8'?>\n"


def _plain(G: nx.DiGraph) -> bool:
    """A directed simple graph whose node names and attribute values are flat scalars."""
    if _attr is None or G.is_multigraph() or not G.is_directed():
        return False
    dicts = [G.graph] + [d for _, d in G.nodes(data=True)] + [d for *_, d in G.edges(data=True)]
    return all(type(v) in _SCALARS for d in dicts for v in d.values()) and \
        all(type(n) in _SCALARS for n in G)


def _start(elem: ET.Element) -> str:
    return f"<{elem.tag}" + "".join(f' {k}="{_attr(v)}"' for k, v in elem.attrib.items()) + ">"


def write_graphml(G: nx.DiGraph, fh: IO[bytes]) -> bool:
    """``nx.write_graphml_xml(G, fh, prettyprint=False)`` in one pass; ``False`` (nothing written) for a graph
    outside this module's scope."""
    if not _plain(G) or "id" in G.graph or _GRAPH_RESERVED & set(G.graph):
        return False
    ref = nx.readwrite.graphml.GraphMLWriter(prettyprint=False)  # its root element and its type names
    xml_type = ref.xml_type
    keys: dict[tuple[str, str, str], str] = {}
    key_lines: list[str] = []

    def data(d: dict[Any, Any], scope: str) -> str:
        out = []
        for k, v in d.items():
            name, t = str(k), xml_type[type(v)]
            kid = keys.get((name, t, scope))
            if kid is None:
                kid = keys[(name, t, scope)] = f"d{len(keys)}"
                key_lines.append(f'<key id="{kid}" for="{scope}" attr.name="{_attr(name)}" attr.type="{t}" />')
            value = str(v)  # (ElementTree writes an element with empty text as an empty element)
            out.append(f'<data key="{kid}">{_text(value)}</data>' if value else f'<data key="{kid}" />')
        return "".join(out)

    # networkx creates the keys in the order of the graph's, the nodes' and the edges' data, and puts the graph's
    # data after its nodes and edges
    graph_data = data(G.graph, "graph")
    body = []
    for n, d in G.nodes(data=True):
        inner = data(d, "node")
        body.append(f'<node id="{_attr(str(n))}">{inner}</node>' if inner else f'<node id="{_attr(str(n))}" />')
    for u, v, d in G.edges(data=True):
        inner = data(d, "edge")
        head = f'<edge source="{_attr(str(u))}" target="{_attr(str(v))}"'
        body.append(f"{head}>{inner}</edge>" if inner else f"{head} />")
    inner = "".join(body) + graph_data
    graph = f'<graph edgedefault="directed">{inner}</graph>' if inner else '<graph edgedefault="directed" />'
    text = _HEADER + _start(ref.xml) + "".join(reversed(key_lines)) + graph + "</graphml>"
    fh.write(text.encode("utf-8", "xmlcharrefreplace"))  # (as ElementTree writes: a lone surrogate as a reference)
    return True


def _gexf_value(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    s = str(v)
    if type(v) is float:
        s = {"inf": "INF", "nan": "NaN", "-inf": "-INF"}.get(s, s)
    return s


def write_gexf(G: nx.DiGraph, fh: IO[bytes], description: str | None = None) -> bool:
    """networkx's ``GEXFWriter(prettyprint=False)`` output for ``G`` in one pass, with ``description`` as a
    ``<description>`` in its ``<meta>`` when given; ``False`` (nothing written) outside this module's scope."""
    if not _plain(G) or {"mode", "name"} & set(G.graph) or _GRAPH_RESERVED & set(G.graph) or \
            any(_GEXF_NODE_RESERVED & set(d) for _, d in G.nodes(data=True)) or \
            any(_GEXF_EDGE_RESERVED & set(d) for *_, d in G.edges(data=True)):
        return False
    ref = nx.readwrite.gexf.GEXFWriter(encoding="utf-8", prettyprint=False)  # root, meta and type names
    xml_type = ref.xml_type
    meta = ref.xml.find("meta")
    if meta is None:  # networkx always writes one; keep the description if a later version does not
        meta = ET.SubElement(ref.xml, "meta")
    if description is not None:
        ET.SubElement(meta, "description").text = description
    ids: dict[str, dict[str, str]] = {"node": {}, "edge": {}}
    declared: dict[str, list[str]] = {"node": [], "edge": []}
    classes: list[str] = []  # in the order the writer inserts their <attributes> at the top of <graph>

    def attvalues(d: dict[Any, Any], cls: str) -> str:
        out = []
        for k, v in d.items():
            title = str(k)
            aid = ids[cls].get(title)
            if aid is None:  # one counter over both classes, as the writer's
                aid = ids[cls][title] = str(len(ids["node"]) + len(ids["edge"]))
                declared[cls].append(f'<attribute id="{aid}" title="{_attr(title)}" type="{xml_type[type(v)]}" />')
                if cls not in classes:
                    classes.append(cls)
            out.append(f'<attvalue for="{aid}" value="{_attr(_gexf_value(v))}" />')
        return f"<attvalues>{''.join(out)}</attvalues>" if out else ""

    nodes = []
    for n, d in G.nodes(data=True):
        d = dict(d)
        label = str(d.pop("label", n))
        inner = attvalues(d, "node")
        head = f'<node id="{_attr(str(n))}" label="{_attr(label)}"'
        nodes.append(f"{head}>{inner}</node>" if inner else f"{head} />")
    edges = []
    for i, (u, v, d) in enumerate(G.edges(data=True)):
        inner = attvalues(d, "edge")
        head = f'<edge source="{_attr(str(u))}" target="{_attr(str(v))}" id="{i}"'
        edges.append(f"{head}>{inner}</edge>" if inner else f"{head} />")
    attributes = "".join(f'<attributes mode="static" class="{c}">{"".join(declared[c])}</attributes>'
                         for c in reversed(classes))
    parts = [_HEADER, _start(ref.xml), ET.tostring(meta, encoding="unicode"),
             '<graph defaultedgetype="directed" mode="static" name="">', attributes,
             "<nodes>" + "".join(nodes) + "</nodes>" if nodes else "<nodes />",
             "<edges>" + "".join(edges) + "</edges>" if edges else "<edges />", "</graph></gexf>"]
    fh.write("".join(parts).encode("utf-8", "xmlcharrefreplace"))
    return True


__all__ = ["write_gexf", "write_graphml"]
