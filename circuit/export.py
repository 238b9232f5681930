"""Saving and loading circuit graphs: node-link JSON, GraphML, GEXF and Graphviz DOT, chosen by suffix.

Every format round-trips to an equal graph (same nodes, edges and attributes with the same types): node and
edge attributes are scalars by construction (:mod:`circuit.graph`), and the DOT writer/reader here quotes and
types every value. A file that is not ours (no ``wordpos_format`` graph attribute) or is truncated raises
``CorruptFileError``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import networkx as nx

from circuit.graph import FORMAT, graph_from_dict, graph_to_dict
from probing.errors import ConfigError, CorruptFileError
from probing.io import atomic_path

FORMATS = (".json", ".graphml", ".gexf", ".dot")


def _check(G: nx.DiGraph, path: Path) -> nx.DiGraph:
    if G.graph.get("wordpos_format") != FORMAT:
        raise CorruptFileError(f"{path} is not a wordpos circuit graph (no wordpos_format={FORMAT!r}); export one with "
                               "`wordpos circuit` or scripts/export_circuit.py.")
    return G


def save_graph(G: nx.DiGraph, path: str | Path) -> Path:
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise ConfigError(f"unknown graph format {suffix!r}; use one of {', '.join(FORMATS)}.")
    with atomic_path(path) as tmp:
        if suffix == ".json":
            tmp.write_text(json.dumps(graph_to_dict(G), indent=1))
        elif suffix == ".graphml":
            nx.write_graphml(G, tmp)
        elif suffix == ".gexf":
            nx.write_gexf(G, tmp)
            _gexf_put_graph_attrs(tmp, G.graph)
        else:
            tmp.write_text(to_dot(G))
    return path


def load_graph(path: str | Path) -> nx.DiGraph:
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise ConfigError(f"unknown graph format {suffix!r}; use one of {', '.join(FORMATS)}.")
    if not path.exists():
        raise CorruptFileError(f"{path} does not exist.")
    try:
        if suffix == ".json":
            G = graph_from_dict(json.loads(path.read_text()))
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
            G = from_dot(path.read_text())
    except CorruptFileError:
        raise
    except Exception as e:
        raise CorruptFileError(f"{path} cannot be read as {suffix[1:]} ({type(e).__name__}: {str(e)[:200]}); it is "
                               "truncated or not a graph. Re-export it from the run directory.") from e
    return _check(nx.DiGraph(G), path)


# ---- GEXF keeps no graph attributes: carry them as JSON in <meta><description> --------------------------------
_GEXF_TAG = "wordpos-graph-attributes:"


def _gexf_put_graph_attrs(path: Path, attrs: dict[str, Any]) -> None:
    import xml.etree.ElementTree as ET

    ns = "http://www.gexf.net/1.2draft"
    ET.register_namespace("", ns)
    ET.register_namespace("xsi", "http://www.w3.org/2001/XMLSchema-instance")
    tree = ET.parse(path)
    root = tree.getroot()
    meta = root.find(f"{{{ns}}}meta")
    if meta is None:
        meta = ET.Element(f"{{{ns}}}meta")
        root.insert(0, meta)
    desc = ET.SubElement(meta, f"{{{ns}}}description")
    desc.text = _GEXF_TAG + json.dumps(attrs)
    tree.write(path, encoding="utf-8", xml_declaration=True)


def _gexf_get_graph_attrs(path: Path) -> dict[str, Any]:
    import xml.etree.ElementTree as ET

    for el in ET.parse(path).getroot().iter():
        if el.tag.endswith("description") and (el.text or "").startswith(_GEXF_TAG):
            return json.loads(el.text[len(_GEXF_TAG):])
    return {}


# ---- Graphviz DOT, typed: every attribute value is written as a JSON literal inside a DOT string ------------
def _attrs(d: dict[str, Any]) -> str:
    items = [f'{k}="{_esc(json.dumps(v))}"' for k, v in d.items()]
    return f" [{', '.join(items)}]" if items else ""


def _esc(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"')


def to_dot(G: nx.DiGraph) -> str:
    lines = ["digraph circuit {", "  rankdir=LR;"]
    lines += [f'  graph{_attrs({k: v})};' for k, v in G.graph.items()]
    for n, d in G.nodes(data=True):
        lines.append(f'  "{_esc(n)}"{_attrs(d)};')
    for u, v, d in G.edges(data=True):
        lines.append(f'  "{_esc(u)}" -> "{_esc(v)}"{_attrs(d)};')
    lines.append("}")
    return "\n".join(lines) + "\n"


_STR = r'"((?:[^"\\]|\\.)*)"'
_ATTR = re.compile(r'(\w+)=' + _STR)
_NODE = re.compile(r'^\s*' + _STR + r'(?:\s*\[(.*)\])?;\s*$')
_EDGE = re.compile(r'^\s*' + _STR + r'\s*->\s*' + _STR + r'(?:\s*\[(.*)\])?;\s*$')
_GRAPH = re.compile(r'^\s*graph\s*\[(.*)\];\s*$')


def _unesc(s: str) -> str:
    return re.sub(r"\\(.)", r"\1", s)


def _parse_attrs(text: str | None) -> dict[str, Any]:
    return {k: json.loads(_unesc(v)) for k, v in _ATTR.findall(text or "")}


def from_dot(text: str) -> nx.DiGraph:
    lines = text.strip().splitlines()
    if not lines or not lines[0].startswith("digraph") or lines[-1].strip() != "}":
        raise CorruptFileError("not a complete DOT digraph (missing header or closing brace).")
    G = nx.DiGraph()
    for line in lines[1:-1]:
        if line.strip() in ("", "rankdir=LR;"):
            continue
        if m := _GRAPH.match(line):
            G.graph.update(_parse_attrs(m.group(1)))
        elif m := _EDGE.match(line):
            G.add_edge(_unesc(m.group(1)), _unesc(m.group(2)), **_parse_attrs(m.group(3)))
        elif m := _NODE.match(line):
            G.add_node(_unesc(m.group(1)), **_parse_attrs(m.group(2)))
        else:
            raise CorruptFileError(f"unreadable DOT line: {line[:80]!r}")
    return G
