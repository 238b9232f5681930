"""Faithfulness curves of edge circuits (MIB circuit-localization track style) from the edge runner.

A *circuit* is an edge mask over :class:`~patching.edge_graph.EdgeGraph` (writers × readers). The runner
(:func:`patching.edge_runner.evaluate_masks`) runs the clean prompt with every edge outside the circuit carrying
its writer's ablated value and reads the normalised probe metric per pair (1 = clean). From those per-pair
values:

* **faithfulness** ``f(C) = (m(C) − m(∅)) / (m(N) − m(∅))`` with ``m`` the *mean over pairs* (as MIB: means
  first, then the ratio); ``m(N)`` is the full model, ``m(∅)`` the circuit with no edge.
* **the curve**: ``f`` at fractions (default 0.1 %, 0.2 %, 0.5 %, 1 %, 2 %, 5 %, 10 %, 20 %, 50 %, 100 %) of the
  valid edges; the circuit at a size ``n = max(1, round(fraction · n_valid))`` is the ``n`` edges with the largest
  ``|score|`` (ties by edge order), then, with ``prune=True`` (default, as MIB's ``apply_topn(prune=True)``),
  dangling nodes and their edges are removed (:func:`prune_dangling`). The x axis is the *nominal* fraction.
* **CPR** = trapezoid area under ``f`` over the fractions on a LINEAR axis, from the first to the last fraction
  (MIB ``evaluate_area_under_curve``, ``log_scale=False``); **CMD** = the trapezoid area of ``|1 − f|``
  (higher CPR is better, CMD 0 is best). With the default fractions the axis spans [0.001, 1].
* **random baseline**: ``n_random`` seeded random edge sets of every size (same pruning), mean and std over the
  draws, and each draw's own CPR/CMD.
* **bootstrap CIs** (percentile, ``1 − alpha``): pairs are resampled with replacement ``n_boot`` times from the
  per-pair values of the same forward passes (no extra forwards); each resample gives ``f`` at every size (and
  for the mean of the random draws), hence CPR/CMD and their difference from random.

Every size and every random set goes through ONE :func:`evaluate_masks` call (or ``ceil(n / max_circuits)`` calls
if ``max_circuits`` is set to bound memory); identical masks are evaluated once. Node-level curves
(:func:`node_curve`) rank heads and MLPs by a node score, keep the top ``k``, and turn the node set into an edge
mask (:func:`node_set_masks`: the edges among kept nodes, from ``input`` and into ``probe``), through the same
runner.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from wordpos.patching.edge_graph import EdgeGraph, EdgeScores
from wordpos.probing.errors import ConfigError, CorruptFileError
from wordpos.probing.io import load_record, record_from_dict, save_record
from wordpos.probing.plots import fast_figure, figure_dict, hline
from wordpos.probing.reprs import short_repr

ABLATIONS = ("counterfactual", "mean", "resample")
DEFAULT_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
CURVE_FORMAT = "wordpos.curve/1"

# an evaluate function: masks [C, W, R] -> object with .values [C, P], .full [P], .empty [P]
Evaluate = Callable[[Tensor], Any]


# ---------------------------------------------------------------------------------------------------- structure
def reader_owner(graph: EdgeGraph) -> Bool[Tensor, "n_writers n_readers"]:
    """``owner[w, r]``: reader ``r`` is an input of writer node ``w``'s computation (a head's q, its key/value
    head's k and v (GQA: shared by the group), an MLP's input). ``input`` owns nothing; ``probe`` has no owner.
    Remembered on the graph (a Python loop over the readers; every pruning round asks)."""
    cached = graph.__dict__.get("_reader_owner")
    if cached is not None:
        return cached.clone()
    own = torch.zeros(graph.n_writers, graph.n_readers, dtype=torch.bool)
    for j, r in enumerate(graph.readers):
        if r == "probe":
            continue
        owners = graph.reader_heads(r) if graph.reader_kind(r) != "mlp" else [r]
        for w in owners:
            own[graph.writer_index(w), j] = True
    graph.__dict__["_reader_owner"] = own
    return own.clone()


def prune_dangling(graph: EdgeGraph, masks: Bool[Tensor, "*batch n_writers n_readers"]
                   ) -> Bool[Tensor, "*batch n_writers n_readers"]:
    """Remove dangling nodes and their edges until nothing changes (EAP-IG ``Graph.prune``): a head or MLP stays
    only if it has an in-circuit edge into one of its readers (``input`` always counts as fed) AND an in-circuit
    edge out; an edge stays only if its writer stays and its reader belongs to a staying node (``probe`` always
    stays). On a DAG the fixpoint keeps exactly the edges on some path ``input → … → probe``."""
    m = torch.as_tensor(masks, dtype=torch.bool) & graph.valid
    own = reader_owner(graph).to(torch.float32)
    inp = graph.writer_index("input")
    probe = graph.reader_index("probe")
    while True:
        has_out = m.any(-1)
        has_in = (m.any(-2).to(torch.float32) @ own.T) > 0
        has_in[..., inp] = True
        nodes = has_out & has_in
        alive = (nodes.to(torch.float32) @ own) > 0
        alive[..., probe] = True
        new = m & nodes[..., :, None] & alive[..., None, :]
        if torch.equal(new, m):
            return new
        m = new


def _edge_order(scores: EdgeScores) -> Tensor:
    """Valid-edge positions (edge_names order) sorted by decreasing |score|, ties by edge order."""
    vals = scores.edge_values()
    if not torch.isfinite(vals).all():
        bad = [scores.graph.edge_names()[i] for i in (~torch.isfinite(vals)).nonzero().flatten()[:5].tolist()]
        raise ConfigError(f"edge scores must be finite on every valid edge; {int((~torch.isfinite(vals)).sum())} are "
                          f"not (e.g. {bad}). Re-run the scoring (score_edges) or drop the NaN pairs.")
    return torch.argsort(vals.abs(), descending=True, stable=True)


def masks_from_order(graph: EdgeGraph, order: Tensor, sizes: Sequence[int]
                     ) -> Bool[Tensor, "n_sizes n_writers n_readers"]:
    """One mask per size: the first ``n`` edges of ``order`` (positions into :meth:`EdgeGraph.edge_index`)."""
    w, r = graph.edge_index()
    rank = torch.empty(len(order), dtype=torch.long)
    rank[order] = torch.arange(len(order))
    keep = rank[None, :] < torch.as_tensor(list(sizes), dtype=torch.long)[:, None]
    masks = torch.zeros(len(sizes), graph.n_writers, graph.n_readers, dtype=torch.bool)
    masks[:, w, r] = keep
    return masks


def top_n_masks(scores: EdgeScores, sizes: Sequence[int], *, prune: bool = True
                ) -> Bool[Tensor, "n_sizes n_writers n_readers"]:
    """The top-``n`` edges by |score| for each ``n`` in ``sizes`` (pruned of dangling nodes if ``prune``)."""
    masks = masks_from_order(scores.graph, _edge_order(scores), sizes)
    return prune_dangling(scores.graph, masks) if prune else masks


def random_masks(graph: EdgeGraph, sizes: Sequence[int], n_random: int, seed: int = 0, *, prune: bool = True
                 ) -> Bool[Tensor, "n_random n_sizes n_writers n_readers"]:
    """``n_random`` seeded random orders of the valid edges; each gives nested sets of every size."""
    gen = torch.Generator().manual_seed(int(seed))
    out = torch.stack([masks_from_order(graph, torch.randperm(graph.n_edges, generator=gen), sizes)
                       for _ in range(n_random)]) if n_random else \
        torch.zeros(0, len(sizes), graph.n_writers, graph.n_readers, dtype=torch.bool)
    return prune_dangling(graph, out) if prune else out


def node_names(graph: EdgeGraph) -> list[str]:
    """The heads and MLPs (every writer but ``input``), in writer order."""
    return [w for w in graph.writers if w != "input"]


def node_set_masks(graph: EdgeGraph, keep: Bool[Tensor, "n_sets n_nodes"]) -> Bool[Tensor, "n_sets n_writers n_readers"]:
    """Edge masks of node sets (``keep`` over :func:`node_names`): every valid edge whose writer is kept or is
    ``input`` and whose reader belongs to a kept node or is ``probe``."""
    keep = torch.as_tensor(keep, dtype=torch.bool)
    if keep.dim() == 1:
        keep = keep[None]
    names = node_names(graph)
    if keep.shape[-1] != len(names):
        raise ConfigError(f"a node set has one flag per head/MLP ({len(names)} here), got {keep.shape[-1]}.")
    idx = torch.tensor([graph.writer_index(n) for n in names])
    wk = torch.zeros(keep.shape[0], graph.n_writers, dtype=torch.bool)
    wk[:, idx] = keep
    wk[:, graph.writer_index("input")] = True
    alive = (wk.to(torch.float32) @ reader_owner(graph).to(torch.float32)) > 0
    alive[:, graph.reader_index("probe")] = True
    return wk[:, :, None] & alive[:, None, :] & graph.valid


def sizes_for(fractions: Sequence[float], n_items: int) -> list[int]:
    """``max(1, round(f · n_items))`` for each fraction > 0 and 0 for a fraction of 0 (MIB truncates; rounding
    with a floor of 1 keeps small graphs' smallest circuits non-empty)."""
    return [0 if f == 0 else max(1, min(n_items, int(round(f * n_items)))) for f in fractions]


def _check_fractions(fractions: Sequence[float]) -> list[float]:
    fr = [float(f) for f in fractions]
    if len(fr) < 2 or any(not 0 <= f <= 1 for f in fr) or any(b <= a for a, b in zip(fr, fr[1:])):
        raise ConfigError(f"fractions must be at least two increasing values in [0, 1], got {fr}.")
    return fr


# ---------------------------------------------------------------------------------------------------- numbers
def trapezoid(x: Sequence[float], y: np.ndarray) -> np.ndarray:
    """Trapezoid area of ``y`` (last axis) over ``x`` on a linear axis (MIB's loop, vectorised)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    return ((y[..., 1:] + y[..., :-1]) / 2 * np.diff(x)).sum(-1)


def faithfulness_of(values: Float[Tensor, "*c n_pairs"], full: Float[Tensor, " n_pairs"],
                    empty: Float[Tensor, " n_pairs"]) -> np.ndarray:
    """``(mean m(C) − mean m(∅)) / (mean m(N) − mean m(∅))`` per circuit."""
    v = torch.as_tensor(values, dtype=torch.float64).mean(-1)
    n = torch.as_tensor(full, dtype=torch.float64).mean()
    e = torch.as_tensor(empty, dtype=torch.float64).mean()
    if abs(float(n - e)) < 1e-12:
        raise ConfigError(f"m(N) = {float(n):.4g} equals m(∅) = {float(e):.4g}: ablating every edge changes nothing, "
                          "so faithfulness is undefined. Use pairs whose clean and corrupted probe readings differ.")
    return ((v - e) / (n - e)).numpy()


def bootstrap_faithfulness(values: Float[Tensor, "c n_pairs"], full: Float[Tensor, " n_pairs"],
                           empty: Float[Tensor, " n_pairs"], n_boot: int = 1000, seed: int = 0
                           ) -> np.ndarray:
    """``[n_boot, c]`` faithfulness of every circuit on pair resamples (the same resample for all circuits)."""
    v = torch.as_tensor(values, dtype=torch.float64)
    P = v.shape[-1]
    gen = torch.Generator().manual_seed(int(seed) + 7919)
    idx = torch.randint(0, P, (int(n_boot), P), generator=gen)
    vb = v[:, idx].mean(-1).T  # [B, C]
    nb = torch.as_tensor(full, dtype=torch.float64)[idx].mean(-1)[:, None]
    eb = torch.as_tensor(empty, dtype=torch.float64)[idx].mean(-1)[:, None]
    den = nb - eb
    den = torch.where(den.abs() < 1e-12, torch.full_like(den, float("nan")), den)
    return ((vb - eb) / den).numpy()


def percentile_ci(samples: np.ndarray, alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval over the first axis (NaN resamples ignored)."""
    q = [100 * alpha / 2, 100 * (1 - alpha / 2)]
    samples = np.asarray(samples)
    # nanpercentile's NaN handling costs several times the percentile itself: only where there is a NaN
    lo, hi = np.nanpercentile(samples, q, axis=0) if np.isnan(samples).any() else np.percentile(samples, q, axis=0)
    return lo, hi


# ---------------------------------------------------------------------------------------------------- result
@dataclass
class Curve:
    """A faithfulness curve with its random baseline, areas and bootstrap intervals (see the module docstring).

    Per-size lists follow ``fractions``; ``random_faithfulness`` is ``[n_random][n_sizes]``. ``sizes`` are the
    items asked for (edges, or nodes for ``level="node"``), ``edges_kept`` the edges the evaluated mask held
    (after pruning); ``random_edges_kept`` the mean over draws. ``chosen`` (optional) marks the reported circuit:
    ``{"n_edges", "fraction", "faithfulness", "ci"}``."""

    level: str
    method: str
    ablation: str
    fractions: list[float]
    sizes: list[int]
    edges_kept: list[int]
    n_items: int
    n_edges_total: int
    faithfulness: list[float]
    ci_low: list[float]
    ci_high: list[float]
    random_faithfulness: list[list[float]]
    random_mean: list[float]
    random_std: list[float]
    random_ci_low: list[float]
    random_ci_high: list[float]
    random_edges_kept: list[float]
    cpr: float
    cmd: float
    cpr_ci: list[float]
    cmd_ci: list[float]
    random_cpr: list[float]
    random_cmd: list[float]
    random_cpr_ci: list[float]
    random_cmd_ci: list[float]
    cpr_minus_random_ci: list[float]
    m_full: float
    m_empty: float
    n_pairs: int
    n_random: int
    n_boot: int
    alpha: float
    seed: int
    prune: bool
    target: float | None = None
    chosen: dict[str, Any] | None = None
    config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.level not in ("edge", "node"):
            raise ConfigError(f"level must be 'edge' or 'node', got {self.level!r}.")
        if self.ablation not in ABLATIONS:
            raise ConfigError(f"ablation must be one of {ABLATIONS}, got {self.ablation!r}.")
        n = len(self.fractions)
        for name in ("sizes", "edges_kept", "faithfulness", "ci_low", "ci_high", "random_mean", "random_std",
                     "random_ci_low", "random_ci_high", "random_edges_kept"):
            if len(getattr(self, name)) != n:
                raise ConfigError(f"Curve.{name} has {len(getattr(self, name))} values for {n} fractions.")
        if any(len(row) != n for row in self.random_faithfulness):
            raise ConfigError("every random draw needs one faithfulness per fraction.")

    def __repr__(self) -> str:
        def ci(lo_hi: list[float]) -> str:
            return f"[{lo_hi[0]:.3f}, {lo_hi[1]:.3f}]" if len(lo_hi) == 2 else ""

        return short_repr(self, [
            f"{self.level} circuits by {self.method} under {self.ablation} ablation",
            f"{len(self.fractions)} sizes of {self.n_items} {'edges' if self.level == 'edge' else 'nodes'}, "
            f"{self.n_pairs} pairs",
            f"CPR {self.cpr:.3f} {ci(self.cpr_ci)}" + (f" vs {self.n_random} random {self.random_cpr_mean:.3f}"
                                                      if self.n_random else ""),
            f"CMD {self.cmd:.3f} {ci(self.cmd_ci)}" + (f" vs random {self.random_cmd_mean:.3f}"
                                                      if self.n_random else "")])

    @property
    def random_cpr_mean(self) -> float:
        return float(np.mean(self.random_cpr)) if self.random_cpr else float("nan")

    @property
    def random_cmd_mean(self) -> float:
        return float(np.mean(self.random_cmd)) if self.random_cmd else float("nan")

    def summary(self) -> dict[str, Any]:
        """The headline numbers (what a report or pipeline summary shows)."""
        return {"level": self.level, "method": self.method, "ablation": self.ablation, "cpr": self.cpr,
                "cpr_ci": self.cpr_ci, "cmd": self.cmd, "cmd_ci": self.cmd_ci,
                "random_cpr_mean": self.random_cpr_mean,
                "random_cpr_std": float(np.std(self.random_cpr)) if self.random_cpr else float("nan"),
                "random_cpr_ci": self.random_cpr_ci, "random_cmd_mean": self.random_cmd_mean,
                "random_cmd_ci": self.random_cmd_ci, "cpr_minus_random_ci": self.cpr_minus_random_ci,
                "n_items": self.n_items, "n_edges_total": self.n_edges_total, "n_pairs": self.n_pairs,
                "n_random": self.n_random, "chosen": self.chosen,
                "points": [{"fraction": f, "size": s, "edges": k, "faithfulness": v, "ci": [lo, hi],
                            "random_mean": rm, "random_std": rs}
                           for f, s, k, v, lo, hi, rm, rs in zip(self.fractions, self.sizes, self.edges_kept,
                                                                 self.faithfulness, self.ci_low, self.ci_high,
                                                                 self.random_mean, self.random_std)]}

    def to_dict(self) -> dict[str, Any]:
        return {"format": CURVE_FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Curve":
        return record_from_dict(cls, d, CURVE_FORMAT, "a faithfulness curve", "curve", "; re-run the evaluation")

    def save(self, directory: str | Path, name: str = "curve") -> Path:
        """``{directory}/{name}.json`` (atomically)."""
        return save_record(self.to_dict(), directory, name)

    @classmethod
    def load(cls, path: str | Path) -> "Curve":
        """Read a curve written by :meth:`save` (the ``.json`` file, or its directory)."""
        return cls.from_dict(load_record(path, "curve", "faithfulness curve"))

    def figure(self, title: str | None = None, others: Sequence["Curve"] = (), as_dict: bool = False
               ) -> go.Figure | dict[str, Any]:
        """f against the fraction of edges (log-x display), CI band, random mean ± std band, the target line and
        the chosen circuit; ``others`` adds more curves (e.g. EAP vs EAP-IG vs node-level) as lines. ``as_dict``:
        the figure's JSON-ready dict (:func:`curve_figure`)."""
        return curve_figure([self, *others], title=title, as_dict=as_dict)


def _label(c: Curve) -> str:
    return f"{c.method} ({c.level}s)"


def curve_figure(curves: Sequence[Curve], title: str | None = None, as_dict: bool = False
                 ) -> go.Figure | dict[str, Any]:
    """Plot one or more curves; the first one's random band, target and chosen size are drawn. ``as_dict``: the
    figure's JSON-ready dict instead of a Figure (:func:`~wordpos.probing.plots.figure_dict`: equal to its
    ``to_dict()``), for a figure that is only written."""
    if not curves:
        raise ConfigError("curve_figure needs at least one Curve.")
    main = curves[0]
    x = main.fractions
    data: list[dict[str, Any]] = [
        dict(type="scatter", x=x + x[::-1], y=list(np.add(main.random_mean, main.random_std)) +
             list(np.subtract(main.random_mean, main.random_std))[::-1], fill="toself",
             fillcolor="rgba(150,150,150,0.25)", line=dict(width=0), hoverinfo="skip",
             name=f"random {main.level} sets: mean ± std ({main.n_random} draws)"),
        dict(type="scatter", x=x, y=main.random_mean, mode="lines+markers", line=dict(color="#777", dash="dot"),
             name=f"random (CPR {main.random_cpr_mean:.3f}, CMD {main.random_cmd_mean:.3f})",
             hovertemplate="fraction %{x}<br>random f = %{y:.3f}<extra></extra>")]
    palette = ["#2166ac", "#d6604d", "#4d9221", "#8073ac", "#e08214"]
    for i, c in enumerate(curves):
        color = palette[i % len(palette)]
        rgb = tuple(int(color[k:k + 2], 16) for k in (1, 3, 5))
        data.append(dict(type="scatter", x=c.fractions + c.fractions[::-1], y=c.ci_high + c.ci_low[::-1],
                         fill="toself", fillcolor=f"rgba({rgb[0]},{rgb[1]},{rgb[2]},0.18)", line=dict(width=0),
                         hoverinfo="skip", showlegend=False))
        text = [f"{s} {c.level}s requested, {k} edges kept<br>95% CI [{lo:.3f}, {hi:.3f}]"
                for s, k, lo, hi in zip(c.sizes, c.edges_kept, c.ci_low, c.ci_high)]
        data.append(dict(type="scatter", x=c.fractions, y=c.faithfulness, mode="lines+markers",
                         line=dict(color=color), name=f"{_label(c)}: CPR {c.cpr:.3f} [{c.cpr_ci[0]:.3f}, "
                                                     f"{c.cpr_ci[1]:.3f}], CMD {c.cmd:.3f}", text=text,
                         hovertemplate="fraction %{x}<br>f = %{y:.3f}<br>%{text}<extra></extra>"))
    layout: dict[str, Any] = {}
    hline(layout, 1.0, dict(color="#1a9850", width=1), "full model (f = 1)", "top left")
    if main.target is not None:
        hline(layout, main.target, dict(color="#b2182b", dash="dash", width=1), f"target f = {main.target:g}",
              "bottom right")
    if main.chosen:
        ch = main.chosen
        ci = ch.get("ci") or [None, None]
        data.append(dict(type="scatter", x=[ch["fraction"]], y=[ch["faithfulness"]], mode="markers",
                         marker=dict(symbol="star", size=16, color="#b2182b", line=dict(color="#333", width=1)),
                         error_y=dict(type="data", symmetric=False,
                                      array=[(ci[1] - ch["faithfulness"]) if ci[1] is not None else 0],
                                      arrayminus=[(ch["faithfulness"] - ci[0]) if ci[0] is not None else 0]),
                         name=f"chosen circuit: {ch['n_edges']} edges, f = {ch['faithfulness']:.3f}"))
    layout.update(
        title=title or (f"Faithfulness curve ({main.ablation} ablation, {main.n_pairs} pairs)<br><sup>x drawn on a "
                        "log scale; CPR/CMD are trapezoid areas over the fraction on a LINEAR axis (MIB); bands: 95% "
                        "bootstrap CI over pairs, random mean ± std</sup>"),
        template="plotly_white", width=900, height=520, hovermode="closest",
        xaxis=dict(type="log", title={"text": f"fraction of {main.level}s kept (of {main.n_items})" + "".join(
            f"; {c.method}: fraction of the {c.n_items} {c.level}s" for c in curves[1:] if c.level != main.level)}),
        yaxis=dict(title={"text": "faithfulness f = (m(C) − m(∅)) / (m(N) − m(∅))"}),
        legend=dict(orientation="h", y=-0.22))
    return figure_dict(data, layout) if as_dict else fast_figure(data, layout)


# ---------------------------------------------------------------------------------------------------- evaluation
def _check_ablation(ablation: str) -> None:
    if ablation not in ABLATIONS:
        raise ConfigError(f"ablation must be one of {ABLATIONS}, got {ablation!r}.")


def make_evaluate(model: Any, ctx: Any, ablation: str = "counterfactual", *, graph: EdgeGraph | None = None,
                  runner: Any = None, progress: bool = False, **kwargs: Any) -> Evaluate:
    """``masks -> EdgeEval``: :func:`patching.edge_runner.evaluate_masks` with ONE runner kept across calls (the
    writers' ablated outputs are computed once; pass ``runner`` to share one with the scoring). ``kwargs`` go to
    :class:`~patching.edge_runner.EdgeRunner` (``seed``, ``reference``, ``max_tokens``)."""
    from wordpos.patching.edge_runner import EdgeRunner

    _check_ablation(ablation)
    if runner is not None and runner.ablation != ablation:
        raise ConfigError(f"the runner ablates with {runner.ablation!r} but {ablation!r} was asked for; build an "
                          f"EdgeRunner with ablation={ablation!r}.")
    runner = runner or EdgeRunner(model, ctx, graph, ablation=ablation, **kwargs)
    return lambda masks: runner.evaluate(masks, progress=progress)


class MemoEvaluate:
    """An :data:`Evaluate` that remembers every mask's per-pair values (keyed by the mask), so that the masks of
    several steps known in advance (the curve's, the node curve's, the search's first round) run as ONE batched
    call (:meth:`prefetch`) and none runs twice. On a GPU each call is a patched forward whose cost is mostly fixed
    (kernel launches), so fewer, larger calls are what makes the circuit stage fast there."""

    def __init__(self, evaluate: Evaluate):
        self.evaluate = evaluate
        self.values: dict[bytes, Tensor] = {}
        self.full: Tensor | None = None
        self.empty: Tensor | None = None
        self.ablation: str | None = None
        self.calls = 0  # calls of the wrapped evaluator

    @staticmethod
    def _key(mask: Tensor) -> bytes:
        return mask.numpy().tobytes()

    def prefetch(self, *masks: Bool[Tensor, "*c w r"]) -> None:
        """Evaluate every mask not seen yet in one call (any leading shape: a curve's ``[s, w, r]``, random sets'
        ``[n_random, s, w, r]``)."""
        flat = [torch.as_tensor(m, dtype=torch.bool) for m in masks]
        flat = [m.reshape(-1, *m.shape[-2:]) for m in flat if m.numel()]
        if flat:
            self(torch.cat(flat))

    def __call__(self, masks: Bool[Tensor, "c w r"]) -> Any:
        masks = torch.as_tensor(masks, dtype=torch.bool).cpu()
        if masks.shape[0] == 0 and self.full is None:
            raise ConfigError("no circuit to evaluate.")
        keys = [self._key(m) for m in masks]
        new, seen = [], set()  # the first index of each mask not evaluated yet
        for i, k in enumerate(keys):
            if k not in self.values and k not in seen:
                seen.add(k)
                new.append(i)
        if new or self.full is None:
            idx = new or [0]
            ev = self.evaluate(masks[idx])
            vals = torch.as_tensor(ev.values, dtype=torch.float64)
            if vals.shape[0] != len(idx):
                raise ConfigError(f"the evaluator returned {vals.shape[0]} circuits for {len(idx)} masks.")
            for i, v in zip(idx, vals):
                self.values[keys[i]] = v
            if self.full is None:
                self.full = torch.as_tensor(ev.full, dtype=torch.float64)
                self.empty = torch.as_tensor(ev.empty, dtype=torch.float64)
                self.ablation = getattr(ev, "ablation", None)
            self.calls += 1
        values = torch.stack([self.values[k] for k in keys]) if keys else torch.zeros(0, len(self.full))
        if self.ablation is None:
            from types import SimpleNamespace

            return SimpleNamespace(values=values, full=self.full.clone(), empty=self.empty.clone())
        from wordpos.patching.edge_runner import EdgeEval

        return EdgeEval(values, self.full.clone(), self.empty.clone(), self.ablation, masks.flatten(1).sum(1))


def run_masks(evaluate: Evaluate, masks: Bool[Tensor, "c w r"], max_circuits: int | None = None
              ) -> tuple[Tensor, Tensor, Tensor]:
    """``(values [C, P], full [P], empty [P])`` of every mask, in one call (or chunks of ``max_circuits``).
    Identical masks (e.g. small sizes that round to the same count, random sets pruned to nothing) are evaluated
    once."""
    if masks.shape[0] == 0:
        raise ConfigError("no circuit to evaluate.")
    uniq, inverse = torch.unique(masks.flatten(1).to(torch.uint8), dim=0, return_inverse=True)
    uniq = uniq.to(torch.bool).reshape(-1, *masks.shape[1:])
    step = uniq.shape[0] if not max_circuits else max(1, int(max_circuits))
    vals, full, empty = [], None, None
    for s in range(0, uniq.shape[0], step):
        ev = evaluate(uniq[s:s + step])
        v = torch.as_tensor(ev.values, dtype=torch.float64)
        if v.shape[0] != uniq[s:s + step].shape[0]:
            raise ConfigError(f"the evaluator returned {v.shape[0]} circuits for {uniq[s:s + step].shape[0]} masks.")
        vals.append(v)
        if full is None:
            full = torch.as_tensor(ev.full, dtype=torch.float64)
            empty = torch.as_tensor(ev.empty, dtype=torch.float64)
    return torch.cat(vals)[inverse], full, empty


def curve_from_masks(graph: EdgeGraph, masks: Bool[Tensor, "s w r"], random: Bool[Tensor, "n_random s w r"],
                     evaluate: Evaluate, *, fractions: Sequence[float], sizes: Sequence[int], level: str, method: str,
                     ablation: str, n_items: int, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0,
                     prune: bool = True, max_circuits: int | None = None, config: dict[str, Any] | None = None) -> Curve:
    """Evaluate the curve's masks and the random ones in one batch and assemble the :class:`Curve`."""
    S, R = masks.shape[0], random.shape[0]
    allm = torch.cat([masks, random.reshape(R * S, *masks.shape[1:])]) if R else masks
    values, full, empty = run_masks(evaluate, allm, max_circuits)
    if values.shape[0] != allm.shape[0]:
        raise ConfigError(f"the evaluator returned {values.shape[0]} circuits for {allm.shape[0]} masks.")
    f = faithfulness_of(values, full, empty)
    fb = bootstrap_faithfulness(values, full, empty, n_boot, seed)  # [B, S + R*S]
    main, rnd = f[:S], f[S:].reshape(R, S)
    main_b, rnd_b = fb[:, :S], fb[:, S:].reshape(fb.shape[0], R, S)
    lo, hi = percentile_ci(main_b, alpha)
    cpr_b, cmd_b = trapezoid(fractions, main_b), trapezoid(fractions, np.abs(1 - main_b))
    if R:
        rmean_b = rnd_b.mean(1)
        rlo, rhi = percentile_ci(rmean_b, alpha)
        rcpr_b, rcmd_b = trapezoid(fractions, rmean_b), trapezoid(fractions, np.abs(1 - rnd_b)).mean(1)
        rand_cpr_ci = [float(v) for v in percentile_ci(rcpr_b, alpha)]
        rand_cmd_ci = [float(v) for v in percentile_ci(rcmd_b, alpha)]
        diff_ci = [float(v) for v in percentile_ci(cpr_b - rcpr_b, alpha)]
        rmean, rstd = rnd.mean(0), rnd.std(0)
        rkept = random.flatten(2).sum(-1).to(torch.float64).mean(0).tolist()
    else:
        nan = [float("nan")] * S
        rlo = rhi = rmean = rstd = np.array(nan)
        rand_cpr_ci = rand_cmd_ci = diff_ci = [float("nan")] * 2
        rkept = nan
    return Curve(
        level=level, method=method, ablation=ablation, fractions=[float(x) for x in fractions],
        sizes=[int(s) for s in sizes], edges_kept=[int(k) for k in masks.flatten(1).sum(-1).tolist()],
        n_items=int(n_items), n_edges_total=graph.n_edges, faithfulness=[float(v) for v in main],
        ci_low=[float(v) for v in lo], ci_high=[float(v) for v in hi],
        random_faithfulness=[[float(v) for v in row] for row in rnd], random_mean=[float(v) for v in rmean],
        random_std=[float(v) for v in rstd], random_ci_low=[float(v) for v in rlo],
        random_ci_high=[float(v) for v in rhi], random_edges_kept=[float(v) for v in rkept],
        cpr=float(trapezoid(fractions, main)), cmd=float(trapezoid(fractions, np.abs(1 - main))),
        cpr_ci=[float(v) for v in percentile_ci(cpr_b, alpha)], cmd_ci=[float(v) for v in percentile_ci(cmd_b, alpha)],
        random_cpr=[float(v) for v in trapezoid(fractions, rnd)] if R else [],
        random_cmd=[float(v) for v in trapezoid(fractions, np.abs(1 - rnd))] if R else [],
        random_cpr_ci=rand_cpr_ci, random_cmd_ci=rand_cmd_ci, cpr_minus_random_ci=diff_ci,
        m_full=float(full.mean()), m_empty=float(empty.mean()), n_pairs=int(values.shape[-1]), n_random=int(R),
        n_boot=int(n_boot), alpha=float(alpha), seed=int(seed), prune=bool(prune), config=dict(config or {}))


class CurveMasks(tuple):
    """``(masks [s, w, r], random [n_random, s, w, r])`` as :func:`curve_masks` or :func:`node_curve_masks` built
    them, remembering from what (``made_of``), so that a curve given them (``masks=``) can refuse another curve's."""

    made_of: dict[str, Any]

    def __new__(cls, masks: Tensor, random: Tensor, **made_of: Any) -> "CurveMasks":
        obj = super().__new__(cls, (masks, random))
        obj.made_of = made_of
        return obj


def _edge_curve_source(scores: EdgeScores, fractions: Sequence[float], n_random: int, seed: int, prune: bool
                       ) -> dict[str, Any]:
    """What :func:`curve_masks` builds its masks from (its ``made_of``; :func:`faithfulness_curve` checks it)."""
    return {"level": "edge", "scores": scores, "fractions": tuple(fractions), "n_random": int(n_random),
            "seed": int(seed), "prune": bool(prune)}


def _node_curve_source(graph: EdgeGraph, node_scores: Any, fractions: Sequence[float], n_random: int, seed: int
                       ) -> dict[str, Any]:
    """What :func:`node_curve_masks` builds its masks from (its ``made_of``; :func:`node_curve` checks it)."""
    return {"level": "node", "graph": graph.to_dict(),
            "node_scores": tuple(torch.as_tensor(node_scores, dtype=torch.float64).flatten().tolist()),
            "fractions": tuple(fractions), "n_random": int(n_random), "seed": int(seed)}


def _given_masks(masks: Any, expected: dict[str, Any], builder: str) -> tuple[Tensor, Tensor]:
    """``masks`` when :func:`curve_masks`/:func:`node_curve_masks` built them from ``expected``; else ConfigError."""
    made = getattr(masks, "made_of", None)
    same = made is not None and made.keys() == expected.keys() and all(
        made[k] is v if k == "scores" else made[k] == v for k, v in expected.items())
    if not same:
        got = f"masks built from {({k: v for k, v in made.items() if k != 'scores'})}" if made else type(masks).__name__
        raise ConfigError(f"masks= must be what {builder} returned for the same arguments ({sorted(expected)}); got "
                          f"{got}. Leave masks=None to build them here.")
    return masks


def curve_masks(scores: EdgeScores, fractions: Sequence[float] = DEFAULT_FRACTIONS, n_random: int = 3, seed: int = 0,
                *, prune: bool = True) -> CurveMasks:
    """The masks :func:`faithfulness_curve` evaluates: the top edges at each fraction and ``n_random`` random edge
    sets of each size (for :meth:`MemoEvaluate.prefetch`)."""
    fractions = _check_fractions(fractions)
    sizes = sizes_for(fractions, scores.graph.n_edges)
    return CurveMasks(top_n_masks(scores, sizes, prune=prune),
                      random_masks(scores.graph, sizes, n_random, seed, prune=prune),
                      **_edge_curve_source(scores, fractions, n_random, seed, prune))


def check_scores(scores: Any) -> None:
    """Refuse what is not edge scores (a tensor, a graph) before any circuit is evaluated."""
    if not isinstance(scores, EdgeScores):
        raise ConfigError(f"scores must be the EdgeScores of wordpos.patching.score_edges(model, ctx), got "
                          f"{type(scores).__name__}.")


def check_alpha(alpha: float) -> None:
    """The confidence intervals' level: ``alpha`` in (0, 1) (0.05: 95% intervals); outside it the bootstrap's
    percentiles cross or leave [0, 100]."""
    if not (isinstance(alpha, numbers.Real) and 0 < alpha < 1):
        raise ConfigError(f"alpha is the intervals' miss rate and must be in (0, 1) (0.05 for 95% intervals), got "
                          f"{alpha!r}.")


def faithfulness_curve(model: Any, ctx: Any, scores: EdgeScores,
                       fractions: Sequence[float] = DEFAULT_FRACTIONS, ablation: str = "counterfactual",
                       n_random: int = 3, n_boot: int = 1000, seed: int = 0, *, prune: bool = True,
                       alpha: float = 0.05, max_circuits: int | None = None, evaluate: Evaluate | None = None,
                       masks: tuple[Tensor, Tensor] | None = None) -> Curve:
    """The edge-level faithfulness curve of ``scores`` (top edges by |score| at each fraction) against
    ``n_random`` random edge sets of each size, with bootstrap CIs; one batched runner call (see module docs).
    Returns a :class:`Curve`: f and its CI at each fraction, the random circuits' f, CPR/CMD for both with CIs
    (``.summary()`` for the headline numbers, ``.figure()`` to draw it).
    ``evaluate`` replaces the runner (``masks -> .values/.full/.empty``), e.g. in tests; ``masks`` is what
    :func:`curve_masks` returned for the same arguments, when the caller has built it already (for a prefetch)."""
    _check_ablation(ablation)
    fractions = _check_fractions(fractions)
    if n_random < 0 or n_boot < 1:
        raise ConfigError(f"n_random must be ≥ 0 and n_boot ≥ 1, got {n_random} and {n_boot}.")
    check_alpha(alpha)
    check_scores(scores)
    graph = scores.graph
    sizes = sizes_for(fractions, graph.n_edges)
    masks, rnd = curve_masks(scores, fractions, n_random, seed, prune=prune) if masks is None else _given_masks(
        masks, _edge_curve_source(scores, fractions, n_random, seed, prune), "curve_masks")
    evaluate = evaluate or make_evaluate(model, ctx, ablation)
    return curve_from_masks(graph, masks, rnd, evaluate, fractions=fractions, sizes=sizes, level="edge",
                            method=scores.method, ablation=ablation, n_items=graph.n_edges, n_boot=n_boot,
                            alpha=alpha, seed=seed, prune=prune, max_circuits=max_circuits,
                            config={"metric": scores.metric, "score_pairs": scores.n_pairs,
                                    "score_config": scores.config})


# ---------------------------------------------------------------------------------------------------- nodes
def node_scores_from_edges(scores: EdgeScores) -> Float[Tensor, " n_nodes"]:
    """Per head/MLP (:func:`node_names` order): the summed |score| of its out-edges."""
    s = torch.nan_to_num(scores.scores.abs(), nan=0.0).sum(-1)
    return s[[scores.graph.writer_index(n) for n in node_names(scores.graph)]]


def node_effects(model: Any, ctx: Any, graph: EdgeGraph, ablation: str = "counterfactual", *,
                 evaluate: Evaluate | None = None, max_circuits: int | None = None) -> Float[Tensor, " n_nodes"]:
    """Each head/MLP's single-node effect ``1 − f`` (every edge out of it ablated, everything else kept), in
    :func:`node_names` order: the node-level baseline of the issue, in one batched runner call."""
    evaluate = evaluate or make_evaluate(model, ctx, ablation)
    names = node_names(graph)
    masks = graph.valid[None].repeat(len(names), 1, 1)
    for i, n in enumerate(names):
        masks[i, graph.writer_index(n)] = False
    values, full, empty = run_masks(evaluate, masks, max_circuits)
    return torch.as_tensor(1 - faithfulness_of(values, full, empty))


def node_curve_masks(graph: EdgeGraph, node_scores: Float[Tensor, " n_nodes"],
                     fractions: Sequence[float] = DEFAULT_FRACTIONS, n_random: int = 3, seed: int = 0
                     ) -> CurveMasks:
    """The masks :func:`node_curve` evaluates: the top heads/MLPs by |node score| at each fraction and
    ``n_random`` random node sets of each size, as edge masks (for :meth:`MemoEvaluate.prefetch`)."""
    fractions = _check_fractions(fractions)
    names = node_names(graph)
    ns = torch.as_tensor(node_scores, dtype=torch.float64)
    if ns.shape != (len(names),) or not torch.isfinite(ns).all():
        raise ConfigError(f"node_scores must be {len(names)} finite values (one per head/MLP in node_names order), "
                          f"got shape {tuple(ns.shape)}.")
    sizes = sizes_for(fractions, len(names))
    order = torch.argsort(ns.abs(), descending=True, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    keep = rank[None] < torch.tensor(sizes)[:, None]
    gen = torch.Generator().manual_seed(int(seed))
    rkeep = []
    for _ in range(n_random):
        perm = torch.randperm(len(names), generator=gen)
        rr = torch.empty_like(perm)
        rr[perm] = torch.arange(len(perm))
        rkeep.append(rr[None] < torch.tensor(sizes)[:, None])
    masks = node_set_masks(graph, keep)
    rnd = torch.stack([node_set_masks(graph, k) for k in rkeep]) if rkeep else \
        torch.zeros(0, len(sizes), graph.n_writers, graph.n_readers, dtype=torch.bool)
    return CurveMasks(masks, rnd, **_node_curve_source(graph, ns, fractions, n_random, seed))


def node_curve(model: Any, ctx: Any, graph: EdgeGraph, node_scores: Float[Tensor, " n_nodes"],
               fractions: Sequence[float] = DEFAULT_FRACTIONS, ablation: str = "counterfactual", n_random: int = 3,
               n_boot: int = 1000, seed: int = 0, *, method: str = "node", alpha: float = 0.05,
               max_circuits: int | None = None, evaluate: Evaluate | None = None,
               masks: tuple[Tensor, Tensor] | None = None) -> Curve:
    """Node-level curve: the top ``k`` heads/MLPs by |node score| at each fraction of the nodes, as edge masks
    (:func:`node_set_masks`), against random node sets of the same sizes; same runner, same statistics.
    ``masks``: what :func:`node_curve_masks` returned for the same arguments, when already built."""
    _check_ablation(ablation)
    fractions = _check_fractions(fractions)
    sizes = sizes_for(fractions, len(node_names(graph)))
    masks, rnd = node_curve_masks(graph, node_scores, fractions, n_random, seed) if masks is None else _given_masks(
        masks, _node_curve_source(graph, node_scores, fractions, n_random, seed), "node_curve_masks")
    names = node_names(graph)
    order = torch.argsort(torch.as_tensor(node_scores, dtype=torch.float64).abs(), descending=True, stable=True)
    evaluate = evaluate or make_evaluate(model, ctx, ablation)
    return curve_from_masks(graph, masks, rnd, evaluate, fractions=fractions, sizes=sizes, level="node",
                            method=method, ablation=ablation, n_items=len(names), n_boot=n_boot, alpha=alpha,
                            seed=seed, prune=False, max_circuits=max_circuits,
                            config={"node_order": [names[i] for i in order.tolist()]})


__all__ = ["ABLATIONS", "Curve", "CurveMasks", "DEFAULT_FRACTIONS", "MemoEvaluate", "bootstrap_faithfulness",
           "curve_figure", "curve_from_masks", "curve_masks", "faithfulness_curve", "faithfulness_of",
           "masks_from_order", "node_curve", "node_curve_masks", "node_effects", "node_names", "node_scores_from_edges",
           "node_set_masks", "percentile_ci", "prune_dangling", "random_masks", "reader_owner", "sizes_for",
           "top_n_masks", "trapezoid"]
