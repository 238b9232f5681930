import networkx as nx
import pytest

from circuit import load_graph, save_graph
from circuit.export import FORMATS
from probing import ConfigError, CorruptFileError



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
