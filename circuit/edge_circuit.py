"""The edge circuit to report: the smallest circuit that reaches a target faithfulness.

Edges are taken in an *order* and the circuit of size ``n`` is the first ``n`` edges of it, pruned of dangling
nodes (:func:`circuit.evaluation.prune_dangling`: a head/MLP with no in-circuit edge into its readers, or none
out of it, goes with its edges). Two orders (``rule``):

* ``"top-n"``: edges by decreasing ``|score|`` (MIB ``apply_topn``).
* ``"greedy"``: grown from the probe (MIB ``apply_greedy``): the next edge is the highest-|score| edge whose reader
  is the probe or belongs to a node already in the circuit, so every prefix is connected to the probe.

The search over ``n`` is a galloping k-ary search: each round is ONE :func:`evaluate_masks` call with up to
``per_call`` sizes: first a geometric grid over ``1..n_valid`` (at least ``1`` and ``n_valid``), then evenly
spaced sizes strictly inside the bracket ``(lo, hi)``, where ``hi`` is the smallest evaluated size reaching the
target and ``lo`` the largest evaluated size below it, until ``hi = lo + 1``; with ``per_call=1`` it is bisection. It
returns the smallest evaluated ``n`` whose circuit reaches the target and whose predecessor ``n − 1`` does not —
the smallest ``n`` if ``f`` is monotone in ``n`` (it is not guaranteed to be; the trace of every evaluated size
is kept). The full graph (``n = n_valid``) has ``f = 1``, so any target ≤ 1 is reached. Faithfulness is from the
means over pairs; its CI is a percentile bootstrap over pairs of the same forward pass.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Bool
from torch import Tensor

from wordpos.circuit.evaluation import (ABLATIONS, Evaluate, MemoEvaluate, _edge_order, bootstrap_faithfulness,
                                        check_alpha, check_scores, faithfulness_of, make_evaluate, masks_from_order,
                                        percentile_ci, prune_dangling, run_masks)
from wordpos.patching.edge_graph import EdgeGraph, EdgeScores
from wordpos.probing.errors import ConfigError
from wordpos.probing.io import load_record, record_from_dict, save_record
from wordpos.probing.reprs import clipped, short_repr

RULES = ("top-n", "greedy")
EDGE_CIRCUIT_FORMAT = "wordpos.edge_circuit/1"

__all__ = ["EdgeCircuit", "RULES", "STAGE_MODULES", "edge_circuit_stage", "edge_order", "first_round_masks",
           "greedy_order", "load_stage_modules", "node_view", "prune_dangling", "select_circuit"]


def greedy_order(scores: EdgeScores) -> Tensor:
    """Valid-edge positions (``edge_names`` order) in MIB's greedy order: start from the edges into the probe,
    repeatedly take the highest-|score| candidate; when an edge brings in a new writer node, the edges into that
    node's readers (its q, its key/value head's k and v, or its MLP input) become candidates."""
    g = scores.graph
    w_idx, r_idx = g.edge_index()
    vals = scores.edge_values().abs()
    _edge_order(scores)  # finiteness check
    by_reader: dict[int, list[int]] = {}
    for e, r in enumerate(r_idx.tolist()):
        by_reader.setdefault(r, []).append(e)
    readers_of: dict[int, list[int]] = {}
    for j, r in enumerate(g.readers):
        if r == "probe":
            continue
        for w in (g.reader_heads(r) if g.reader_kind(r) != "mlp" else [r]):
            readers_of.setdefault(g.writer_index(w), []).append(j)
    heap: list[tuple[float, int]] = []
    pushed_readers: set[int] = set()

    def push_reader(j: int) -> None:
        if j in pushed_readers:
            return
        pushed_readers.add(j)
        for e in by_reader.get(j, []):
            heapq.heappush(heap, (-float(vals[e]), e))

    push_reader(g.reader_index("probe"))
    seen_writers: set[int] = set()
    order: list[int] = []
    w_list = w_idx.tolist()
    while heap:
        _, e = heapq.heappop(heap)
        order.append(e)
        w = w_list[e]
        if w not in seen_writers:
            seen_writers.add(w)
            for j in readers_of.get(w, []):
                push_reader(j)
    if len(order) != g.n_edges:  # every node writes to the probe, so every edge is reached
        rest = sorted(set(range(g.n_edges)) - set(order), key=lambda e: -float(vals[e]))
        order += rest
    return torch.tensor(order, dtype=torch.long)


def edge_order(scores: EdgeScores, rule: str = "top-n") -> Tensor:
    if rule not in RULES:
        raise ConfigError(f"rule must be one of {RULES}, got {rule!r}.")
    return _edge_order(scores) if rule == "top-n" else greedy_order(scores)


def node_view(graph: EdgeGraph, mask: Bool[Tensor, "n_writers n_readers"]) -> dict[str, Any]:
    """Which heads and MLPs a circuit holds (a node is in it when it has an in-circuit out-edge), and for each
    head which of its inputs (q, k, v) receive in-circuit edges (GQA: k/v of its key/value head)."""
    m = torch.as_tensor(mask, dtype=torch.bool) & graph.valid
    out_deg = m.sum(-1)
    in_deg_r = m.sum(0)
    heads, mlps = [], []
    for i, w in enumerate(graph.writers):
        if w == "input" or out_deg[i] == 0:
            continue
        if w.startswith("m"):
            mlps.append({"name": w, "layer": int(w[1:]), "in_edges": int(in_deg_r[graph.reader_index(w)]),
                         "out_edges": int(out_deg[i])})
            continue
        L, h = (int(x) for x in w[1:].split(".h"))
        kv = h // graph.group_size
        ins = {"q": int(in_deg_r[graph.reader_index(f"a{L}.h{h}<q>")]),
               "k": int(in_deg_r[graph.reader_index(f"a{L}.h{kv}<k>")]),
               "v": int(in_deg_r[graph.reader_index(f"a{L}.h{kv}<v>")])}
        heads.append({"name": w, "layer": L, "head": h, "inputs": [k for k, n in ins.items() if n > 0],
                      "in_edges": ins, "out_edges": int(out_deg[i])})
    inp = graph.writer_index("input")
    return {"heads": heads, "mlps": mlps, "input_edges": int(out_deg[inp]),
            "probe_edges": int(in_deg_r[graph.reader_index("probe")]),
            "head_names": [h["name"] for h in heads], "mlp_names": [x["name"] for x in mlps]}


@dataclass
class EdgeCircuit:
    """The chosen circuit: its edges (sorted by |score|), size, faithfulness with CI, node view and the trace of
    the search (``[{"n", "edges", "faithfulness"}]`` for every evaluated size, in evaluation order)."""

    graph: dict[str, Any]
    rule: str
    target: float
    ablation: str
    method: str
    prune: bool
    n_top: int
    edges: list[str]
    edge_scores: list[float]
    n_valid: int
    faithfulness: float
    ci: list[float]
    reached: bool
    nodes: dict[str, Any]
    m_full: float
    m_empty: float
    n_pairs: int
    rounds: int
    trace: list[dict[str, Any]] = field(default_factory=list)
    alpha: float = 0.05

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ConfigError(f"rule must be one of {RULES}, got {self.rule!r}.")
        if self.ablation not in ABLATIONS:
            raise ConfigError(f"ablation must be one of {ABLATIONS}, got {self.ablation!r}.")
        if len(self.edges) != len(self.edge_scores):
            raise ConfigError("edges and edge_scores must have one entry per edge.")

    def __repr__(self) -> str:
        heads = [h["name"] for h in self.nodes.get("heads", [])]
        ci = f" [{self.ci[0]:.3f}, {self.ci[1]:.3f}]" if len(self.ci) == 2 else ""
        return short_repr(self, [
            f"{self.n_edges} of {self.n_valid} edges ({self.percent_of_graph:.1f}%)",
            f"f = {self.faithfulness:.3f}{ci} under {self.ablation} ablation, target {self.target:g} "
            + ("reached" if self.reached else "not reached"),
            f"{self.method} scores, {self.rule} rule",
            f"heads {clipped(heads, 8)}" if heads else "no heads",
            f"MLPs {clipped(self.nodes.get('mlp_names', []), 8)}" if self.nodes.get("mlp_names") else "no MLPs"])

    def figure(self, title: str | None = None) -> Any:
        """The circuit's diagram (plotly, with a slider over how many of its edges are drawn)."""
        from wordpos.circuit.edge_render import render_circuit_edges

        title = title or f"edge circuit into the layer-{self.graph['probe_layer']} probe"
        return render_circuit_edges(self, title=title)

    @property
    def n_edges(self) -> int:
        return len(self.edges)

    @property
    def percent_of_graph(self) -> float:
        return 100.0 * self.n_edges / self.n_valid if self.n_valid else float("nan")

    @property
    def fraction(self) -> float:
        """The nominal fraction ``n_top / n_valid`` (the x of the faithfulness curve)."""
        return self.n_top / self.n_valid if self.n_valid else float("nan")

    def edge_graph(self) -> EdgeGraph:
        return EdgeGraph.from_dict(self.graph)

    def mask(self, graph: EdgeGraph | None = None) -> Bool[Tensor, "n_writers n_readers"]:
        return (graph or self.edge_graph()).mask_from_edges(self.edges)

    def summary(self) -> dict[str, Any]:
        """The headline numbers as a JSON-ready dict (what ``summary.json`` and the report show)."""
        return {"edges": self.n_edges, "percent_of_graph": self.percent_of_graph, "n_valid": self.n_valid,
                "n_top": self.n_top, "faithfulness": self.faithfulness, "ci": self.ci, "reached": self.reached,
                "target": self.target, "rule": self.rule, "ablation": self.ablation, "method": self.method,
                "heads": [f"{h['name']}<{''.join(h['inputs'])}>" if h["inputs"] else h["name"]
                          for h in self.nodes["heads"]], "mlps": self.nodes["mlp_names"],
                "rounds": self.rounds, "evaluated_sizes": len(self.trace)}

    def chosen_marker(self) -> dict[str, Any]:
        """What :attr:`circuit.evaluation.Curve.chosen` takes."""
        return {"n_edges": self.n_edges, "n_top": self.n_top, "fraction": self.fraction,
                "faithfulness": self.faithfulness, "ci": self.ci}

    def to_dict(self) -> dict[str, Any]:
        return {"format": EDGE_CIRCUIT_FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EdgeCircuit":
        return record_from_dict(cls, d, EDGE_CIRCUIT_FORMAT, "an edge circuit", "edge circuit")

    def save(self, directory: str | Path, name: str = "edge_circuit") -> Path:
        """``{directory}/{name}.json`` (atomically); returns that file's path."""
        return save_record(self.to_dict(), directory, name)

    @classmethod
    def load(cls, path: str | Path) -> "EdgeCircuit":
        """Read a circuit written by :meth:`save` (the ``.json`` file, or its directory)."""
        return cls.from_dict(load_record(path, "edge_circuit", "edge circuit"))


def _geometric(lo: int, hi: int, k: int) -> list[int]:
    """Up to ``k`` distinct ints in ``(lo, hi]``, geometrically spaced from ``lo + 1``, always including ``hi``."""
    a = lo + 1
    if hi - lo <= k:
        return list(range(a, hi + 1))
    pts = {int(round(math.exp(x))) for x in np.linspace(math.log(a), math.log(hi), k)}
    return sorted({min(max(p, a), hi) for p in pts} | {hi})


def _interior(lo: int, hi: int, k: int) -> list[int]:
    """Up to ``k`` distinct ints strictly inside ``(lo, hi)``, evenly spaced (``k = 1``: the midpoint)."""
    if hi - lo - 1 <= k:
        return list(range(lo + 1, hi))
    return sorted({lo + max(1, min(hi - lo - 1, int(round((hi - lo) * (i + 1) / (k + 1))))) for i in range(k)})


def _first_round(n_edges: int, per_call: int) -> list[int]:
    """The sizes the search of :func:`select_circuit` evaluates first: a geometric grid over ``1..n_edges`` that
    always holds 1 and ``n_edges``."""
    return _geometric(0, n_edges, max(2, per_call))


def first_round_masks(scores: EdgeScores, rule: str = "top-n", *, prune: bool = True, per_call: int = 8
                      ) -> Bool[Tensor, "k n_writers n_readers"]:
    """The circuits the search of :func:`select_circuit` evaluates first, known before any evaluation: for
    :meth:`~wordpos.circuit.evaluation.MemoEvaluate.prefetch`."""
    graph = scores.graph
    masks = masks_from_order(graph, edge_order(scores, rule), _first_round(graph.n_edges, per_call))
    return prune_dangling(graph, masks) if prune else masks


def select_circuit(model: Any, ctx: Any, scores: EdgeScores, target: float = 0.8, rule: str = "top-n", *,
                   ablation: str = "counterfactual", prune: bool = True, per_call: int = 8, max_rounds: int = 40,
                   n_boot: int = 1000, alpha: float = 0.05, seed: int = 0, max_circuits: int | None = None,
                   evaluate: Evaluate | None = None) -> EdgeCircuit:
    """The smallest circuit (in ``rule``'s edge order, dangling nodes pruned) with faithfulness ≥ ``target``
    (see the module docstring for the search), as an :class:`EdgeCircuit`: its edges and their scores, f with a
    bootstrap CI over pairs under ``ablation`` of everything else, whether the target was reached, its heads and
    MLPs (``nodes``) and every size tried (``trace``). ``evaluate`` replaces the runner (``masks ->
    .values/.full/.empty``).
    """
    target = float(target)
    if not 0 < target <= 1:
        raise ConfigError(f"target is a faithfulness in (0, 1] (the full graph has f = 1), got {target}.")
    if ablation not in ABLATIONS:
        raise ConfigError(f"ablation must be one of {ABLATIONS}, got {ablation!r}.")
    if per_call < 1 or max_rounds < 1:
        raise ConfigError(f"per_call and max_rounds must be ≥ 1, got {per_call} and {max_rounds}.")
    if n_boot < 1:
        raise ConfigError(f"n_boot (bootstrap resamples of the pairs) must be ≥ 1, got {n_boot}.")
    check_alpha(alpha)
    check_scores(scores)
    graph = scores.graph
    order = edge_order(scores, rule)
    N = graph.n_edges
    evaluate = evaluate or make_evaluate(model, ctx, ablation)
    # a pruned mask seen before (here or in a prefetch) is not re-run
    memo = evaluate if isinstance(evaluate, MemoEvaluate) else MemoEvaluate(evaluate)
    f_of: dict[int, float] = {}
    values_of: dict[int, Tensor] = {}
    kept_of: dict[int, int] = {}
    trace: list[dict[str, Any]] = []
    full = empty = None

    def run(sizes: list[int]) -> None:
        nonlocal full, empty
        sizes = [n for n in sizes if n not in f_of]
        if not sizes:
            return
        masks = masks_from_order(graph, order, sizes)
        if prune:
            masks = prune_dangling(graph, masks)
        vals, full, empty = run_masks(memo, masks, max_circuits)
        for n, v, m in zip(sizes, vals, masks):
            fv = float(faithfulness_of(v[None], full, empty)[0])
            f_of[n], values_of[n], kept_of[n] = fv, v, int(m.sum())
            trace.append({"n": int(n), "edges": kept_of[n], "faithfulness": fv})

    rounds = 0
    grid = _first_round(N, per_call)
    while True:
        run(grid)
        rounds += 1
        passing = [n for n in f_of if f_of[n] >= target]
        hi = min(passing) if passing else N
        lo = max((n for n in f_of if n < hi), default=0)
        if hi - lo <= 1 or not passing or rounds >= max_rounds:
            break
        grid = _interior(lo, hi, per_call)
    reached = f_of.get(hi, -math.inf) >= target
    mask = masks_from_order(graph, order, [hi])[0]
    if prune:
        mask = prune_dangling(graph, mask)
    fb = bootstrap_faithfulness(values_of[hi][None], full, empty, n_boot, seed)
    lo_ci, hi_ci = percentile_ci(fb, alpha)
    w, r = mask.nonzero(as_tuple=True)
    sv = scores.scores[w, r]
    srt = torch.argsort(sv.abs(), descending=True, stable=True).tolist()
    names = [f"{graph.writers[int(w[i])]}->{graph.readers[int(r[i])]}" for i in srt]
    return EdgeCircuit(graph=graph.to_dict(), rule=rule, target=target, ablation=ablation, method=scores.method,
                       prune=prune, n_top=int(hi), edges=names, edge_scores=[float(sv[i]) for i in srt], n_valid=N,
                       faithfulness=f_of[hi], ci=[float(lo_ci[0]), float(hi_ci[0])], reached=bool(reached),
                       nodes=node_view(graph, mask), m_full=float(full.mean()), m_empty=float(empty.mean()),
                       n_pairs=int(full.shape[-1]), rounds=rounds, trace=trace, alpha=alpha)


#: what :func:`edge_circuit_stage` imports when it runs (networkx with ``export``): ``wordpos run`` loads them before
#: its stages, as the patching stages' modules load with the pipeline, and times that apart (``circuit imports``)
STAGE_MODULES = ("wordpos.circuit.edge_render", "wordpos.circuit.export", "wordpos.patching.eap",
                 "wordpos.patching.edge_runner", "wordpos.probing.io", "wordpos.probing.plots")


def load_stage_modules() -> None:
    """Import :data:`STAGE_MODULES` (a no-op once they are loaded)."""
    import importlib

    for name in STAGE_MODULES:
        importlib.import_module(name)


def edge_circuit_stage(engine: Any, ctx: Any, out_dir: str | Path, scores: str = "eap-ig",
                       ablation: str = "counterfactual", target: float = 0.8, steps: int = 5, n_random: int = 3,
                       progress: bool = True, *, rule: str = "top-n", n_boot: int = 1000, seed: int = 0,
                       node_baseline: str | None = "edge-sum", model_name: str | None = None,
                       png: bool = True) -> dict[str, Any]:
    """The edge circuit end to end, into ``out_dir`` (the run's ``circuit/`` directory): edge scores
    (``scores`` = "eap" | "eap-ig" | "exact", ``steps`` IG points), the faithfulness curve with ``n_random`` random
    sets per size (and, with ``node_baseline`` "edge-sum" (heads/MLPs ranked by summed |edge score| out) or
    "effect" (single-node ablation effect), the node-level curve), the smallest circuit reaching ``target``
    (``rule`` "top-n" | "greedy"), its diagram and exports. One :class:`~patching.edge_runner.EdgeRunner` serves
    every step. Files: ``edge_scores.npz/json``, ``curve.json``, ``curve.html/png``, ``edge_circuit.json``,
    ``circuit_edges.json`` (MIB style), ``graph.{json,gexf,graphml,dot}`` (the circuit's edges, reader as an edge
    attribute), ``circuit.html/png``, and ``circuit.json`` (the returned summary)."""
    import time

    t0 = time.perf_counter()
    load_stage_modules()  # (already loaded by wordpos run, which times them apart)
    from wordpos.circuit.edge_render import render_circuit_edges, save_edge_circuit_figure
    from wordpos.circuit.evaluation import (MemoEvaluate, curve_masks, faithfulness_curve, node_curve, node_curve_masks,
                                            node_effects, node_scores_from_edges)
    from wordpos.circuit.export import save_edge_graph, save_mib_json
    from wordpos.patching.eap import score_edges
    from wordpos.patching.edge_runner import EdgeRunner
    from wordpos.probing.io import write_json
    from wordpos.probing.plots import save_figures

    if ablation not in ABLATIONS:
        raise ConfigError(f"ablation must be one of {ABLATIONS}, got {ablation!r}.")
    if node_baseline not in (None, "edge-sum", "effect"):
        raise ConfigError(f"node_baseline must be None, 'edge-sum' or 'effect', got {node_baseline!r}.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {"imports": time.perf_counter() - t0}

    def say(msg: str) -> None:
        if progress:
            print(f"[wordpos circuit] {msg}", flush=True)

    t0 = time.perf_counter()
    runner = EdgeRunner(engine, ctx, ablation=ablation)
    evaluate = make_evaluate(engine, ctx, ablation, runner=runner)
    graph = runner.graph
    say(f"graph up to layer {graph.probe_layer}: {graph.n_writers} writers × {graph.n_readers} readers, "
        f"{graph.n_edges} edges; scoring with {scores} ({ablation} ablation)")
    sc = score_edges(engine, ctx, method=scores, steps=steps, ablation=ablation, runner=runner, progress=progress)
    sc.save(out)
    timings["scores"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    # every circuit known before any evaluation (the curve's, the node curve's, the search's first round) in one
    # batched call: on a GPU each call costs a patched forward's fixed launches, whatever its size
    evaluate = MemoEvaluate(evaluate)
    ns = None
    if node_baseline is not None:
        ns = node_scores_from_edges(sc) if node_baseline == "edge-sum" else \
            node_effects(engine, ctx, graph, ablation, evaluate=evaluate)
    cmasks = curve_masks(sc, n_random=n_random, seed=seed)  # built once: for the prefetch and the curves
    nmasks = node_curve_masks(graph, ns, n_random=n_random, seed=seed) if ns is not None else None
    evaluate.prefetch(first_round_masks(sc, rule), *cmasks, *(nmasks or ()))
    timings["prefetch"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    circuit = select_circuit(engine, ctx, sc, target=target, rule=rule, ablation=ablation, n_boot=n_boot, seed=seed,
                             evaluate=evaluate)
    timings["select"] = time.perf_counter() - t0
    say(f"smallest circuit with f ≥ {target:g}: {circuit.n_edges} edges ({circuit.percent_of_graph:.2f}% of the "
        f"graph), f = {circuit.faithfulness:.3f} [{circuit.ci[0]:.3f}, {circuit.ci[1]:.3f}]")
    t0 = time.perf_counter()
    curve = faithfulness_curve(engine, ctx, sc, ablation=ablation, n_random=n_random, n_boot=n_boot, seed=seed,
                               evaluate=evaluate, masks=cmasks)
    curve.target, curve.chosen = target, circuit.chosen_marker()
    curve.save(out)
    others = []
    if ns is not None:
        ncurve = node_curve(engine, ctx, graph, ns, ablation=ablation, n_random=n_random, n_boot=n_boot, seed=seed,
                            method=f"node ({node_baseline})", evaluate=evaluate, masks=nmasks)
        ncurve.save(out, name="node_curve")
        others.append(ncurve)
    timings["curve"] = time.perf_counter() - t0
    say(f"curve: CPR {curve.cpr:.3f} [{curve.cpr_ci[0]:.3f}, {curve.cpr_ci[1]:.3f}] vs random "
        f"{curve.random_cpr_mean:.3f}; CMD {curve.cmd:.3f} vs random {curve.random_cmd_mean:.3f}")
    from wordpos.probing.engines import as_engine

    t0 = time.perf_counter()
    name = model_name or as_engine(engine).name
    files: dict[str, list[str]] = {}
    written = save_figures({"curve": curve.figure(
        title=f"{name}: faithfulness of {scores} edge circuits ({ablation} ablation, {curve.n_pairs} pairs)<br><sup>"
              "x drawn on a log scale; CPR/CMD are trapezoid areas over the fraction on a LINEAR axis (MIB); bands: "
              "95% bootstrap CI over pairs, random mean ± std</sup>", others=others, as_dict=True)}, out, png=png)
    files["curve"] = [str(p) for p in written["curve"]]
    circuit.save(out)
    mask = circuit.mask(graph)
    files["mib"] = [str(save_mib_json(sc, out / "circuit_edges.json", mask))]
    files["graph"] = [str(p) for p in save_edge_graph(sc, out, mask, circuit_only=True, model=str(name),
                                                       ablation=ablation, target=float(target),
                                                       faithfulness=float(circuit.faithfulness))]
    fig = render_circuit_edges(circuit, title=f"{name}: edge circuit into the layer-{graph.probe_layer} probe",
                               as_dict=True)  # only written: its JSON-ready dict, without making a Figure
    files["circuit"] = [str(p) for p in save_edge_circuit_figure(fig, out, png=png)["circuit"]]
    files["scores"] = [str(out / "edge_scores.npz"), str(out / "edge_scores.json")]
    files["data"] = [str(out / "curve.json"), str(out / "edge_circuit.json")] + \
        ([str(out / "node_curve.json")] if others else [])
    timings["render"] = time.perf_counter() - t0  # figures and exports
    cs = circuit.summary()
    heads = [h["name"] for h in circuit.nodes["heads"]]
    summary = {
        "kind": "edge", "model": str(name), "scores": scores, "ablation": ablation, "rule": rule, "steps": steps,
        "target": target, "probe_layer": graph.probe_layer, "n_pairs": curve.n_pairs,
        "edges": circuit.n_edges, "nodes": len(heads) + len(circuit.nodes["mlps"]) + 2,
        "n_valid_edges": graph.n_edges, "percent_of_graph": circuit.percent_of_graph, "reached": circuit.reached,
        "faithfulness": {"share": circuit.faithfulness, "ci": circuit.ci, "method": ablation, "target": target,
                         "m_full": circuit.m_full, "m_empty": circuit.m_empty},
        "heads": [f"{h['layer']}.{h['head']}" for h in circuit.nodes["heads"]],
        "head_inputs": {f"{h['layer']}.{h['head']}": h["inputs"] for h in circuit.nodes["heads"]},
        "mlps": [int(m["layer"]) for m in circuit.nodes["mlps"]],
        "circuit": cs, "top_edges": [{"edge": e, "score": s} for e, s in
                                     zip(circuit.edges[:20], circuit.edge_scores[:20])],
        "curve": curve.summary(),
        "node_curve": others[0].summary() if others else None,
        "cpr": curve.cpr, "cpr_ci": curve.cpr_ci, "cmd": curve.cmd, "cmd_ci": curve.cmd_ci,
        "random_cpr": curve.random_cpr_mean, "random_cpr_ci": curve.random_cpr_ci,
        "random_cmd": curve.random_cmd_mean, "random_cmd_ci": curve.random_cmd_ci,
        "cpr_minus_random_ci": curve.cpr_minus_random_ci,
        "files": files, "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }
    write_json(out / "circuit.json", summary)
    files["summary"] = [str(out / "circuit.json")]
    return summary
