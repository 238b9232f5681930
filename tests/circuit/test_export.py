import json
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest

from wordpos.circuit import load_graph, save_graph
from wordpos.circuit.export import FORMATS
from wordpos.probing import ConfigError, CorruptFileError

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("suffix", FORMATS)
def test_round_trip_gives_an_equal_graph(synthetic, tmp_path, suffix):
    G = synthetic
    path = save_graph(G, tmp_path / f"g{suffix}")
    H = load_graph(path)
    assert nx.utils.graphs_equal(G, H)
    for n in G:
        for k, v in G.nodes[n].items():
            assert H.nodes[n][k] == v and type(H.nodes[n][k]) is type(v), (n, k)
    for u, v in G.edges:
        for k, val in G.edges[u, v].items():
            assert H.edges[u, v][k] == val and type(H.edges[u, v][k]) is type(val), (u, v, k)


@pytest.mark.parametrize("suffix", FORMATS)
def test_truncated_file_is_a_clear_error(synthetic, tmp_path, suffix):
    path = save_graph(synthetic, tmp_path / f"g{suffix}")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match="truncated|not a complete|unreadable|cannot be read"):
        load_graph(path)


def test_foreign_graph_and_unknown_format(tmp_path):
    nx.write_graphml(nx.path_graph(3, create_using=nx.DiGraph), tmp_path / "x.graphml")
    with pytest.raises(CorruptFileError, match="not a wordpos circuit graph"):
        load_graph(tmp_path / "x.graphml")
    with pytest.raises(ConfigError, match="unknown graph format"):
        save_graph(nx.DiGraph(), tmp_path / "x.pdf")


def test_pruned_graph_round_trips_and_dot_is_graphviz_shaped(synthetic, tmp_path):
    from wordpos.circuit import prune_min_edges

    G = prune_min_edges(synthetic, 0.9).graph
    for suffix in FORMATS:
        H = load_graph(save_graph(G, tmp_path / f"p{suffix}"))
        assert nx.utils.graphs_equal(G, H), suffix
    text = (tmp_path / "p.dot").read_text()
    assert text.splitlines()[1].startswith("digraph") and "rank=same" in text and "penwidth" in text
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_foreign_files_are_refused(synthetic, tmp_path):
    (tmp_path / "x.dot").write_text('digraph G {\n  a -> b;\n}\n')
    (tmp_path / "x.json").write_text(json.dumps(nx.node_link_data(nx.path_graph(3), edges="edges")))
    nx.write_gexf(nx.path_graph(3, create_using=nx.DiGraph), tmp_path / "x.gexf")
    (tmp_path / "y.graphml").write_bytes(b"\x89PNG not xml")
    for name in ("x.dot", "x.json", "x.gexf", "y.graphml"):
        with pytest.raises(CorruptFileError, match="not a wordpos|cannot be read|not a statement"):
            load_graph(tmp_path / name)
    with pytest.raises(CorruptFileError, match="does not exist"):
        load_graph(tmp_path / "missing.json")
    bad = synthetic.copy()
    bad.nodes["0.2"]["scores"] = {"a": 1.0}
    with pytest.raises(ConfigError, match="flatten"):
        save_graph(bad, tmp_path / "bad.graphml")
    H = load_graph(save_graph(bad, tmp_path / "bad.dot"))  # DOT and JSON keep any JSON value
    assert H.nodes["0.2"]["scores"] == {"a": 1.0}


def test_export_script(synthetic, tmp_path):
    run = tmp_path / "run"
    save_graph(synthetic, run / "circuit" / "graph.json")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "export_circuit.py"), str(run), "--formats",
                           "json,graphml,gexf,dot,html", "--out", str(out)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for suffix in ("json", "graphml", "gexf", "dot"):
        assert nx.utils.graphs_equal(load_graph(out / f"graph.{suffix}"), synthetic)
    assert (out / "graph.html").stat().st_size > 1_000_000
    bad = subprocess.run([sys.executable, str(ROOT / "scripts" / "export_circuit.py"), str(run), "--formats", "pdf"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert bad.returncode != 0 and "pdf" in bad.stderr


def test_dot_quotes_each_attribute_key_as_it_is():
    """``True``, ``1`` and ``1.0`` are one dict key: a cache of quoted keys must not write one for another."""
    from wordpos.circuit.export import to_dot

    G = nx.DiGraph()
    G.add_node("a", **{"kind": "head"})
    G.nodes["a"][True] = "x"
    G.add_node("b", kind="mlp")
    G.nodes["b"][1] = "y"
    G.add_edge("a", "b")
    G.edges["a", "b"][1.0] = "z"
    G.add_edge("b", "a")
    G.edges["b", "a"][1] = "w"
    text = to_dot(G)
    assert '"a" ["kind"="head", "True"="x"' in text and '"b" ["kind"="mlp", "1"="y"' in text
    assert '"a" -> "b" ["1.0"="z"' in text and '"b" -> "a" ["1"="w"' in text
