"""Faithfulness curves, CPR/CMD, bootstrap intervals, dangling-node pruning and circuit selection, checked with
hand-made graphs/scores and fake evaluators against independent references (hand trapezoids, a networkx path
reference, brute-force search). No model is run here."""

from __future__ import annotations

from types import SimpleNamespace

import networkx as nx
import numpy as np
import pytest
import torch

from wordpos.circuit.edge_circuit import EdgeCircuit, greedy_order, node_view, select_circuit
from wordpos.circuit.evaluation import (Curve, faithfulness_curve, node_curve, node_names, node_set_masks,
                                        prune_dangling, random_masks, top_n_masks)
from wordpos.patching.edge_graph import EdgeGraph, EdgeScores
from wordpos.probing.errors import ConfigError, CorruptFileError


def _graph(n_layers=2, n_heads=2, n_kv=2, probe=1) -> EdgeGraph:
    return EdgeGraph.build(n_layers, n_heads, n_kv, probe)


def _scores(graph: EdgeGraph, seed=0) -> EdgeScores:
    rng = np.random.default_rng(seed)
    return EdgeScores(graph, torch.tensor(rng.normal(size=tuple(graph.valid.shape))), "eap-ig", "m", 8)


class CountEvaluator:
    """m(C) per pair = a_p + g(x) + noise · e_p · sin(7x) · (1 − x), x = |C| / n_valid: f = g(x) exactly without noise
    (m(N) = a_p + 1, m(∅) = a_p); with noise each pair scatters around it (mean-zero e_p)."""

    def __init__(self, graph, n_pairs=16, g=lambda x: x, noise=0.0, seed=0):
        rng = np.random.default_rng(seed)
        self.graph, self.g, self.noise = graph, g, noise
        self.a = torch.tensor(rng.normal(0, 0.1, n_pairs))
        e = rng.normal(0, 1, n_pairs)
        self.e = torch.tensor(e - e.mean())
        self.calls = 0
        self.seen = 0

    def __call__(self, masks):
        self.calls += 1
        self.seen += masks.shape[0]
        x = (masks & self.graph.valid).flatten(1).sum(-1).double() / self.graph.n_edges
        gx = torch.tensor([self.g(float(v)) for v in x], dtype=torch.float64)
        wobble = self.noise * self.e[None] * (torch.sin(7 * x.double()) * (1 - x.double()))[:, None]
        return SimpleNamespace(values=self.a[None] + gx[:, None] + wobble, full=self.a + 1, empty=self.a)


# ------------------------------------------------------------------------------------------------ CPR / CMD
def _mib_areas(x, f):
    """MIB's loop, written out: trapezoids of f and of |1 - f| over consecutive fractions (linear axis)."""
    under = from1 = 0.0
    for i in range(len(f) - 1):
        dx = x[i + 1] - x[i]
        under += dx * (f[i] + f[i + 1]) / 2
        from1 += dx * (abs(1 - f[i]) + abs(1 - f[i + 1])) / 2
    return under, from1


def test_cpr_of_f_equals_fraction_is_one_half():
    """f = fraction of edges over [0, 1] (the empty circuit at 0, the full graph at 1): CPR = CMD = 1/2."""
    g = EdgeGraph.build(2, 4, 4, 1)
    assert g.n_edges == 110  # every fraction below is a whole number of edges
    fr = [i / 10 for i in range(11)]
    c = faithfulness_curve(None, None, _scores(g), fractions=fr, n_random=0, prune=False, evaluate=CountEvaluator(g))
    assert c.sizes == [11 * i for i in range(11)]
    np.testing.assert_allclose(c.faithfulness, fr, atol=1e-12)
    assert c.cpr == pytest.approx(0.5, abs=1e-12) and c.cmd == pytest.approx(0.5, abs=1e-12)


def test_cpr_cmd_on_the_default_fractions_match_a_hand_trapezoid():
    g = _graph()
    ev = CountEvaluator(g, g=lambda x: min(1.3, 3 * x))  # overshoots 1: CMD counts |1 - f|
    c = faithfulness_curve(None, None, _scores(g), n_random=3, prune=False, evaluate=ev)
    assert ev.calls == 1  # every size and every random set in one batched call
    distinct = {m.numpy().tobytes() for m in torch.cat([top_n_masks(_scores(g), c.sizes, prune=False),
                                                         random_masks(g, c.sizes, 3, 0, prune=False).flatten(0, 1)])}
    assert ev.seen == len(distinct) < 10 * (1 + 3)  # identical masks (sizes rounding to 1 edge) run once
    x = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]
    f = [min(1.3, 3 * max(1, round(v * g.n_edges)) / g.n_edges) for v in x]
    np.testing.assert_allclose(c.faithfulness, f, atol=1e-12)
    cpr, cmd = _mib_areas(x, f)
    assert c.cpr == pytest.approx(cpr) and c.cmd == pytest.approx(cmd)
    # random sets of the same sizes (no pruning) have the same counts -> the same f here
    np.testing.assert_allclose(c.random_mean, f, atol=1e-12)
    assert c.edges_kept == [max(1, round(v * g.n_edges)) for v in x]
    for rc, rm in zip(c.random_cpr, c.random_cmd):  # each random curve's areas, by the same hand loop
        assert (rc, rm) == pytest.approx((cpr, cmd))


def test_percentile_ci_is_numpys_percentile_interval():
    from wordpos.circuit.evaluation import percentile_ci

    samples = np.random.default_rng(0).normal(size=(2000, 3))
    samples[5, 1] = np.nan  # NaN resamples are ignored
    for alpha in (0.05, 0.1):
        lo, hi = percentile_ci(samples, alpha)
        ref = np.nanpercentile(samples, [100 * alpha / 2, 100 - 100 * alpha / 2], axis=0)
        np.testing.assert_allclose([lo, hi], ref)
    clean = samples[np.isfinite(samples).all(1)]  # without NaN (the fast path): the same as numpy's nanpercentile
    np.testing.assert_array_equal(percentile_ci(clean), np.nanpercentile(clean, [2.5, 97.5], axis=0))
    for one_d in (clean[:, 0], samples[:, 1]):  # one curve's samples ([n_boot]), with and without a NaN
        np.testing.assert_array_equal(percentile_ci(one_d), np.nanpercentile(one_d, [2.5, 97.5]))
    lo, hi = percentile_ci(samples)
    assert np.all(np.abs(lo + 1.96) < 0.2) and np.all(np.abs(hi - 1.96) < 0.2)  # the normal's 2.5% / 97.5% points


def test_bootstrap_values_are_faithfulness_of_pair_resamples():
    """Three pairs whose circuit values 1, 10, 100 identify which pairs a resample drew; m(N) = 2, m(∅) = 0, so each
    bootstrap value must be (mean of the drawn values) / 2, and their average the plain estimate 37 / 2."""
    from itertools import combinations_with_replacement

    from wordpos.circuit.evaluation import bootstrap_faithfulness

    v = torch.tensor([[1.0, 10.0, 100.0]], dtype=torch.float64)
    full, empty = torch.full((3,), 2.0, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    boot = bootstrap_faithfulness(v, full, empty, n_boot=4000, seed=1)
    assert boot.shape == (4000, 1)
    allowed = {round(sum(c) / 3 / 2, 9) for c in combinations_with_replacement([1.0, 10.0, 100.0], 3)}
    assert {round(float(b), 9) for b in boot[:, 0]} <= allowed
    assert boot.mean() == pytest.approx(37 / 2, rel=0.03)


def test_random_sets_are_seeded_and_of_each_size():
    g = _graph()
    sizes = [1, 5, 20]
    a, b = random_masks(g, sizes, 3, seed=4, prune=False), random_masks(g, sizes, 3, seed=4, prune=False)
    assert torch.equal(a, b)
    assert a.shape == (3, 3, g.n_writers, g.n_readers)
    assert (a.flatten(2).sum(-1) == torch.tensor(sizes)).all()
    assert not torch.equal(a, random_masks(g, sizes, 3, seed=5, prune=False))
    assert not (a & ~g.valid).any()


# ------------------------------------------------------------------------------------------------ bootstrap
def test_bootstrap_ci_contains_the_estimate_and_narrows_with_more_pairs():
    g = _graph()
    widths = []
    for n_pairs in (16, 400):
        ev = CountEvaluator(g, n_pairs=n_pairs, g=lambda x: x ** 0.5, noise=0.5, seed=1)
        c = faithfulness_curve(None, None, _scores(g), n_random=3, prune=False, evaluate=ev, n_boot=500)
        f, lo, hi = map(np.asarray, (c.faithfulness, c.ci_low, c.ci_high))
        assert (lo <= f + 1e-12).all() and (f <= hi + 1e-12).all()
        assert c.cpr_ci[0] <= c.cpr <= c.cpr_ci[1] and c.cmd_ci[0] <= c.cmd <= c.cmd_ci[1]
        widths.append(float(np.mean(hi - lo)))
        # the estimate is the ratio of the means, recomputed by hand from the evaluator's pairs
        out = ev(top_n_masks(_scores(g), c.sizes, prune=False))
        ref = (out.values.mean(-1) - out.empty.mean()) / (out.full.mean() - out.empty.mean())
        np.testing.assert_allclose(c.faithfulness, ref.numpy(), atol=1e-12)
    assert widths[1] < widths[0] / 2


# ------------------------------------------------------------------------------------------------ pruning
def _reference_prune(graph: EdgeGraph, mask: torch.Tensor) -> torch.Tensor:
    """Keep an edge (w, r) iff w is reachable from input and r's node reaches the probe, on the node graph where
    every in-circuit edge w -> r becomes w -> (the heads/MLP that read r)."""
    G = nx.DiGraph()
    G.add_nodes_from(graph.writers + ["probe"])
    owners = {}
    for r in graph.readers:
        owners[r] = ["probe"] if r == "probe" else (graph.reader_heads(r) or [r])
    for i, j in mask.nonzero().tolist():
        for o in owners[graph.readers[j]]:
            G.add_edge(graph.writers[i], o)
    from_input = nx.descendants(G, "input") | {"input"}
    to_probe = nx.ancestors(G, "probe") | {"probe"}
    out = torch.zeros_like(mask)
    for i, j in mask.nonzero().tolist():
        w = graph.writers[i]
        if w in from_input and w in to_probe and any(o in to_probe and o in from_input
                                                     for o in owners[graph.readers[j]]):
            out[i, j] = True
    return out


def test_prune_dangling_on_a_hand_built_graph():
    g = _graph()
    keep = ["input->a0.h0<v>", "a0.h0->a1.h1<v>", "a1.h1->probe", "input->m0", "m0->probe"]
    dangling = ["a0.h1->a1.h0<q>",  # a0.h1 is fed by nothing; a1.h0 writes nowhere
                "input->a1.h0<k>",  # a1.h0 writes nowhere
                "a0.h1->probe",     # a0.h1 is fed by nothing
                "input->m1"]        # m1 writes nowhere
    m = g.mask_from_edges(keep + dangling)
    pruned = prune_dangling(g, m)
    assert torch.equal(pruned, g.mask_from_edges(keep))
    assert torch.equal(prune_dangling(g, pruned), pruned)
    view = node_view(g, pruned)
    assert view["head_names"] == ["a0.h0", "a1.h1"] and view["mlp_names"] == ["m0"]
    assert [h["inputs"] for h in view["heads"]] == [["v"], ["v"]]


@pytest.mark.parametrize("kv", [4, 2])  # with grouped-query attention a k/v reader feeds two query heads
def test_prune_dangling_matches_a_path_reference_on_random_masks(kv):
    g = EdgeGraph.build(3, 4, kv, 2)
    gen = torch.Generator().manual_seed(0)
    for density in (0.02, 0.05, 0.1, 0.3):
        masks = (torch.rand(20, g.n_writers, g.n_readers, generator=gen) < density) & g.valid
        pruned = prune_dangling(g, masks)
        for m, p in zip(masks, pruned):
            assert torch.equal(p, _reference_prune(g, m))


def test_node_set_masks():
    g = _graph()
    names = node_names(g)
    keep = torch.tensor([n in ("a0.h1", "m1") for n in names])
    m = node_set_masks(g, keep)[0]
    expected = {"input->a0.h1<q>", "input->a0.h1<k>", "input->a0.h1<v>", "input->m1", "a0.h1->m1",
                "a0.h1->probe", "m1->probe", "input->probe"}
    got = {n for n, k in zip(g.edge_names(), m[g.edge_index()].tolist()) if k}
    assert got == expected


def test_node_curve_counts_nodes_and_uses_one_call():
    g = _graph()
    ev = CountEvaluator(g)
    ns = torch.arange(len(node_names(g)), dtype=torch.float64)
    c = node_curve(None, None, g, ns, fractions=(0.2, 0.5, 1.0), n_random=3, evaluate=ev)
    assert ev.calls == 1 and c.level == "node" and c.sizes == [1, 3, 6]
    assert c.faithfulness[-1] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------ selection
def _brute_smallest(g, scores, rule, fn, target, prune):
    """The smallest n whose circuit (first n edges of the order, pruned) reaches the target, by trying all n."""
    from wordpos.circuit.edge_circuit import edge_order
    from wordpos.circuit.evaluation import masks_from_order

    order = edge_order(scores, rule)
    for n in range(1, g.n_edges + 1):
        m = masks_from_order(g, order, [n])
        if prune:
            m = prune_dangling(g, m)
        if fn(float(m.sum()) / g.n_edges) >= target:
            return n
    raise AssertionError


@pytest.mark.parametrize("rule", ["top-n", "greedy"])
@pytest.mark.parametrize("per_call", [1, 8])
@pytest.mark.parametrize("prune", [False, True])
def test_select_circuit_finds_the_smallest_n_on_a_monotone_evaluator(rule, per_call, prune):
    g = EdgeGraph.build(3, 4, 4, 2)
    s = _scores(g, seed=3)
    fn = lambda x: 1 - np.exp(-x * 9)  # noqa: E731  monotone in the number of edges kept
    ev = CountEvaluator(g, g=fn)
    c = select_circuit(None, None, s, target=0.8, rule=rule, per_call=per_call, prune=prune, evaluate=ev)
    assert c.n_top == _brute_smallest(g, s, rule, fn, 0.8, prune)
    assert c.reached and c.faithfulness >= 0.8
    assert ev.calls <= c.rounds  # at most one runner call per round (pruned masks seen before are not re-run)
    assert c.ci[0] <= c.faithfulness <= c.ci[1]
    if per_call == 8:
        assert c.rounds <= 6
    back = EdgeCircuit.from_dict(c.to_dict())
    assert back == c and torch.equal(back.mask(), g.mask_from_edges(c.edges))


def test_select_circuit_keeps_the_edges_that_carry_the_effect():
    """A planted toy: only two paths count (input -> a0.h1 -> a1.h0 -> probe via v, and m0 -> probe); the scores
    rank them first; the selected circuit is exactly those edges after pruning."""
    g = _graph()
    carriers = ["input->a0.h1<v>", "a0.h1->a1.h0<v>", "a1.h0->probe", "input->m0", "m0->probe"]
    weight = {"a1.h0->probe": 0.6, "m0->probe": 0.4}
    sc = torch.tensor(np.random.default_rng(0).normal(0, 0.01, tuple(g.valid.shape)))
    for e in carriers:
        sc[g.edge(e)] = 1.0
    s = EdgeScores(g, sc, "exact", "m", 4)

    def ev(masks):
        masks = prune_dangling(g, masks)
        vals = []
        for m in masks:
            path1 = all(m[g.edge(e)] for e in carriers[:3])
            path2 = all(m[g.edge(e)] for e in carriers[3:])
            vals.append(weight["a1.h0->probe"] * path1 + weight["m0->probe"] * path2)
        v = torch.tensor(vals, dtype=torch.float64)[:, None].repeat(1, 4)
        return SimpleNamespace(values=v, full=torch.ones(4, dtype=torch.float64), empty=torch.zeros(4, dtype=torch.float64))

    c = select_circuit(None, None, s, target=0.98, evaluate=ev)
    assert sorted(c.edges) == sorted(carriers)
    assert c.faithfulness == pytest.approx(1.0)
    assert c.nodes["head_names"] == ["a0.h1", "a1.h0"] and c.nodes["mlp_names"] == ["m0"]


def test_greedy_prefixes_stay_connected_to_the_probe():
    g = EdgeGraph.build(3, 4, 2, 2)
    s = _scores(g, seed=5)
    order = greedy_order(s)
    assert sorted(order.tolist()) == list(range(g.n_edges))
    w, r = g.edge_index()
    in_circuit = set()
    for e in order.tolist():
        reader = g.readers[int(r[e])]
        owners = g.reader_heads(reader) or ([reader] if reader != "probe" else [])
        assert reader == "probe" or any(o in in_circuit for o in owners)
        in_circuit.add(g.writers[int(w[e])])


def test_select_circuit_rejects_bad_settings():
    g = _graph()
    with pytest.raises(ConfigError, match="target"):
        select_circuit(None, None, _scores(g), target=1.5, evaluate=CountEvaluator(g))
    with pytest.raises(ConfigError, match="rule"):
        select_circuit(None, None, _scores(g), rule="best", evaluate=CountEvaluator(g))


# ------------------------------------------------------------------------------------------------ Curve I/O
def test_curve_round_trips_and_plots(tmp_path):
    g = _graph()
    c = faithfulness_curve(None, None, _scores(g), n_random=3, evaluate=CountEvaluator(g, noise=0.3))
    c.target, c.chosen = 0.8, {"n_edges": 5, "n_top": 5, "fraction": 0.05, "faithfulness": 0.85, "ci": [0.8, 0.9]}
    path = c.save(tmp_path)
    assert path.name == "curve.json"
    back = Curve.load(tmp_path)
    assert back.to_dict() == c.to_dict()
    fig = back.figure()
    assert fig.layout.xaxis.type == "log"
    assert "LINEAR" in fig.layout.title.text
    names = [t.name or "" for t in fig.data]
    assert any(n.startswith("chosen circuit") for n in names) and any(n.startswith("random") for n in names)
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(CorruptFileError):
        Curve.load(tmp_path / "bad.json")


def _ref_curve_figure(curves, title):
    """The curve figure as plotly's API builds it (add_trace, add_hline, update_layout): the reference."""
    import numpy as np
    import plotly.graph_objects as go

    main = curves[0]
    x = main.fractions
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=x + x[::-1], y=list(np.add(main.random_mean, main.random_std)) +
                             list(np.subtract(main.random_mean, main.random_std))[::-1], fill="toself",
                             fillcolor="rgba(150,150,150,0.25)", line=dict(width=0), hoverinfo="skip",
                             name=f"random {main.level} sets: mean ± std ({main.n_random} draws)"))
    fig.add_trace(go.Scatter(x=x, y=main.random_mean, mode="lines+markers", line=dict(color="#777", dash="dot"),
                             name=f"random (CPR {main.random_cpr_mean:.3f}, CMD {main.random_cmd_mean:.3f})",
                             hovertemplate="fraction %{x}<br>random f = %{y:.3f}<extra></extra>"))
    palette = ["#2166ac", "#d6604d", "#4d9221", "#8073ac", "#e08214"]
    for i, c in enumerate(curves):
        color = palette[i % len(palette)]
        rgb = tuple(int(color[k:k + 2], 16) for k in (1, 3, 5))
        fig.add_trace(go.Scatter(x=c.fractions + c.fractions[::-1], y=c.ci_high + c.ci_low[::-1], fill="toself",
                                 fillcolor=f"rgba({rgb[0]},{rgb[1]},{rgb[2]},0.18)", line=dict(width=0),
                                 hoverinfo="skip", showlegend=False))
        text = [f"{s} {c.level}s requested, {k} edges kept<br>95% CI [{lo:.3f}, {hi:.3f}]"
                for s, k, lo, hi in zip(c.sizes, c.edges_kept, c.ci_low, c.ci_high)]
        fig.add_trace(go.Scatter(x=c.fractions, y=c.faithfulness, mode="lines+markers", line=dict(color=color),
                                 name=f"{c.method} ({c.level}s): CPR {c.cpr:.3f} [{c.cpr_ci[0]:.3f}, "
                                      f"{c.cpr_ci[1]:.3f}], CMD {c.cmd:.3f}", text=text,
                                 hovertemplate="fraction %{x}<br>f = %{y:.3f}<br>%{text}<extra></extra>"))
    fig.add_hline(y=1.0, line=dict(color="#1a9850", width=1), annotation_text="full model (f = 1)",
                  annotation_position="top left")
    if main.target is not None:
        fig.add_hline(y=main.target, line=dict(color="#b2182b", dash="dash", width=1),
                      annotation_text=f"target f = {main.target:g}", annotation_position="bottom right")
    if main.chosen:
        ch = main.chosen
        ci = ch.get("ci") or [None, None]
        fig.add_trace(go.Scatter(x=[ch["fraction"]], y=[ch["faithfulness"]], mode="markers",
                                 marker=dict(symbol="star", size=16, color="#b2182b", line=dict(color="#333", width=1)),
                                 error_y=dict(type="data", symmetric=False,
                                              array=[(ci[1] - ch["faithfulness"]) if ci[1] is not None else 0],
                                              arrayminus=[(ch["faithfulness"] - ci[0]) if ci[0] is not None else 0]),
                                 name=f"chosen circuit: {ch['n_edges']} edges, f = {ch['faithfulness']:.3f}"))
    fig.update_layout(title=title, template="plotly_white", width=900, height=520, hovermode="closest",
                      xaxis=dict(type="log", title=f"fraction of {main.level}s kept (of {main.n_items})" + "".join(
                          f"; {c.method}: fraction of the {c.n_items} {c.level}s" for c in curves[1:]
                          if c.level != main.level)),
                      yaxis=dict(title="faithfulness f = (m(C) − m(∅)) / (m(N) − m(∅))"),
                      legend=dict(orientation="h", y=-0.22))
    return fig


def test_curve_figure_equals_plotly_api_figure():
    """The curve figure is built without plotly's validation (probing.plots.fast_figure): it equals the figure
    plotly's API builds from the same calls, as the JSON the HTML embeds, with and without target, chosen circuit
    and a second (node-level) curve."""
    import json

    import plotly.io as pio

    from wordpos.circuit.evaluation import curve_figure, node_curve, node_scores_from_edges

    g = _graph()
    s = _scores(g)
    c = faithfulness_curve(None, None, s, n_random=3, evaluate=CountEvaluator(g, noise=0.3))
    n = node_curve(None, None, g, node_scores_from_edges(s), n_random=2, evaluate=CountEvaluator(g, noise=0.1))
    cases = [([c], "T")]
    c2 = Curve.from_dict(c.to_dict())
    c2.target, c2.chosen = 0.8, {"n_edges": 5, "n_top": 5, "fraction": 0.05, "faithfulness": 0.85, "ci": [0.8, 0.9]}
    cases += [([c2, n], "T2"), ([c2], "T3")]
    for curves, title in cases:
        fast, ref = curve_figure(curves, title), _ref_curve_figure(curves, title)
        assert json.loads(pio.to_json(fast)) == json.loads(pio.to_json(ref))
        plain = curve_figure(curves, title, as_dict=True)  # the JSON-ready dict wordpos run writes, as written
        assert pio.to_json(plain, validate=False) == pio.to_json(fast)


def test_node_effects_ablate_each_node_alone():
    """With f = fraction of edges kept, a node's single-node effect 1 − f is its out-degree / n_edges."""
    from wordpos.circuit.evaluation import node_effects, node_scores_from_edges

    g = _graph()
    eff = node_effects(None, None, g, evaluate=CountEvaluator(g))
    out_deg = torch.tensor([int(g.valid[g.writer_index(n)].sum()) for n in node_names(g)], dtype=torch.float64)
    torch.testing.assert_close(eff, out_deg / g.n_edges)
    s = _scores(g)
    ref = torch.tensor([sum(abs(float(s.scores[g.edge(e)])) for e in g.edge_names() if e.split("->")[0] == n)
                        for n in node_names(g)], dtype=torch.float64)
    torch.testing.assert_close(node_scores_from_edges(s), ref)


# ------------------------------------------------------------------------------------------------ memo / prefetch
def test_prefetch_runs_every_known_circuit_in_one_call_and_changes_no_number():
    """The stage's fold: the search's first round, the edge curve and the node curve prefetched in ONE evaluator call;
    then the curve, the node curve and the search give exactly what they give on their own evaluator (a noisy
    count evaluator: values differ per mask and per pair), and no mask is evaluated twice."""
    from wordpos.circuit.edge_circuit import first_round_masks
    from wordpos.circuit.evaluation import MemoEvaluate, curve_masks, node_curve_masks

    g = EdgeGraph.build(3, 4, 2, 2)
    s = _scores(g, seed=5)
    ns = torch.tensor(np.random.default_rng(1).normal(size=len(node_names(g))))
    fn = lambda x: 1 - np.exp(-x * 9)  # noqa: E731
    inner = CountEvaluator(g, g=fn, noise=0.3)
    memo = MemoEvaluate(inner)
    cm, nm = curve_masks(s, n_random=3, seed=2), node_curve_masks(g, ns, n_random=3, seed=2)
    known = [first_round_masks(s), *cm, *nm]
    memo.prefetch(*known)
    n_unique = len({m.numpy().tobytes() for k in known for m in k.reshape(-1, *k.shape[-2:])})
    assert inner.calls == 1 and inner.seen == n_unique
    # as the stage does: the curves take the masks it built for the prefetch (and a wrong set is refused)
    c1 = faithfulness_curve(None, None, s, n_random=3, seed=2, evaluate=memo, masks=cm)
    n1 = node_curve(None, None, g, ns, n_random=3, seed=2, evaluate=memo, masks=nm)
    # another curve's masks, even of the same shapes, are refused: each argument they were built from must match
    refused = {"curve_masks": [dict(n_random=2, seed=2), dict(n_random=3, seed=3), dict(n_random=3, seed=2, prune=False),
                               dict(n_random=3, seed=2, fractions=(0.01, 0.03, 0.06, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0))],
               "node_curve_masks": [dict(n_random=2, seed=2), dict(n_random=3, seed=4)]}
    for kw in refused["curve_masks"]:
        with pytest.raises(ConfigError, match="masks= must be what curve_masks returned"):
            faithfulness_curve(None, None, s, evaluate=memo, masks=cm, **kw)
    with pytest.raises(ConfigError, match="masks= must be what curve_masks returned"):
        faithfulness_curve(None, None, s, n_random=3, seed=2, evaluate=memo, masks=nm)  # the node curve's
    with pytest.raises(ConfigError, match="masks= must be what curve_masks returned"):
        faithfulness_curve(None, None, _scores(g, seed=6), n_random=3, seed=2, evaluate=memo, masks=cm)  # other scores
    with pytest.raises(ConfigError, match="masks= must be what curve_masks returned"):
        faithfulness_curve(None, None, s, n_random=3, seed=2, evaluate=memo, masks=tuple(cm))  # a plain pair
    for kw in refused["node_curve_masks"]:
        with pytest.raises(ConfigError, match="masks= must be what node_curve_masks returned"):
            node_curve(None, None, g, ns, evaluate=memo, masks=nm, **kw)
    with pytest.raises(ConfigError, match="masks= must be what node_curve_masks returned"):
        node_curve(None, None, g, ns + 1, n_random=3, seed=2, evaluate=memo, masks=nm)  # other node scores
    assert inner.calls == 1  # both curves came from the prefetch
    sel = select_circuit(None, None, s, target=0.8, evaluate=memo)
    assert inner.calls == sel.rounds  # the first round was prefetched: one call per later round
    seen = inner.seen
    # the references: each step on its own evaluator (same values per mask: the evaluator is a function of it)
    c2 = faithfulness_curve(None, None, s, n_random=3, seed=2, evaluate=CountEvaluator(g, g=fn, noise=0.3))
    n2 = node_curve(None, None, g, ns, n_random=3, seed=2, evaluate=CountEvaluator(g, g=fn, noise=0.3))
    ref = select_circuit(None, None, s, target=0.8, evaluate=CountEvaluator(g, g=fn, noise=0.3))
    assert c1.to_dict() == c2.to_dict() and n1.to_dict() == n2.to_dict()
    assert sel.to_dict() == ref.to_dict()
    memo(torch.stack([g.full_mask(), g.empty_mask()]))  # seen before or not: each mask at most once
    assert inner.seen <= seen + 2
    assert memo(torch.stack([g.full_mask(), g.full_mask()])).values.shape == (2, 16)
    assert inner.seen <= seen + 2
