import numpy as np
import pytest

from wordpos.circuit import build_graph
from wordpos.patching.results import EffectResult
from wordpos.patching.roles import HeadRoles

EDGE_AXES = ("sender_layer", "sender_head", "receiver_layer", "receiver_head", "via")


@pytest.fixture
def synthetic():
    """A graph with a known structure: 0.2 → probe (0.8), 0.2 → 1.1 via v (0.5), 1.1 → probe (0.3), noise."""
    rng = np.random.default_rng(0)
    direct = rng.normal(0, 0.01, (2, 4))
    direct[0, 2], direct[1, 1] = 0.8, 0.3
    edges = np.full((2, 4, 2, 4, 3), np.nan)
    edges[0, :, 1, :, :] = rng.normal(0, 0.01, (4, 4, 3))
    edges[0, 2, 1, 1, 2] = 0.5
    roles = HeadRoles({k: rng.random((2, 4)) for k in ("to_anchor", "to_space", "to_prev", "to_bos",
                                                        "counter_score")}, 10)
    G = build_graph(EffectResult(direct, ("layer", "head"), "path", "m"),
                    EffectResult(edges, EDGE_AXES, "path", "m", coords={"via": ["q", "k", "v"]}), roles,
                    EffectResult(np.array([0.001, 0.002]), ("layer",), "activation", "m"),
                    model="toy", probe_layer=1, metric="m", n_prompts=8, n_heads=4)
    return G


