"""Edge attribution with the probe metric: EAP, EAP-IG and exact edge patching, as dense [writers × readers] scores.

* **EAP** (Syed et al. 2023; MIB): ``score(w, r) = Σ_{pairs, positions} (ablated_w − clean_w) · ∂m/∂(input of r)``,
  the gradient taken on the clean run: one forward and one backward per batch. It is the first-order estimate of
  ``m(N with only (w, r) ablated) − m(N)`` (exact when the reader is linear in its input, e.g. the probe).
* **EAP-IG** (Hanna et al. 2024, ``hannamw/EAP-IG`` ``get_scores_eap_ig``): the same product, with the gradient
  averaged over ``steps`` runs of the clean prompt whose input embeddings (the residual entering layer 0) are
  interpolated between the ablated and the clean input: ``x_α = x_abl + α (x_clean − x_abl)``. The points are
  ``points="left"`` (EAP-IG's: α = k/steps, k = 0..steps−1), ``"midpoint"`` (α = (k + ½)/steps) or ``"right"``
  (α = k/steps, k = 1..steps; ``steps=1`` is plain EAP). The writer differences stay the clean-vs-ablated ones.
  Summed over the edges out of ``input`` the scores tend to ``m(∅_input) − m(N)`` as ``steps`` grows
  (completeness of integrated gradients along the input path).
* **exact**: :meth:`wordpos.patching.edge_runner.EdgeRunner.exact_scores` (one circuit per edge, batched).

With a shared prefix (the runner's ``p0 > 0``, see :mod:`wordpos.patching.edge_runner`) the forward and backward
run positions ``p0..`` only: before ``p0`` every writer difference ``ablated_w − clean_w`` is zero (and every
interpolated input equals the clean one), so the gradients there never enter a score.

Scores estimate ``m(N without the edge) − m(N)`` in normalised units (1 = clean − corrupted), averaged over
pairs; important edges are usually negative.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import einops
import torch
from torch import Tensor

from wordpos.patching.edge_graph import EdgeGraph, EdgeScores
from wordpos.patching.edge_runner import Ablation, EdgeRunner, tokens_per_forward
from wordpos.probing.errors import ConfigError
from wordpos.probing.progress import progress_bar

Method = Literal["eap", "eap-ig", "exact"]
Points = Literal["left", "midpoint", "right"]


def ig_alphas(steps: int, points: Points = "left") -> list[float]:
    """The interpolation points α (0 = ablated input, 1 = clean input) at which EAP-IG takes gradients."""
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be a positive integer, got {steps!r}.")
    if points == "left":
        return [k / steps for k in range(steps)]
    if points == "midpoint":
        return [(k + 0.5) / steps for k in range(steps)]
    if points == "right":
        return [k / steps for k in range(1, steps + 1)]
    raise ConfigError(f"points must be 'left', 'midpoint' or 'right', got {points!r}.")


def reader_gradients(runner: EdgeRunner, sl: slice, alphas: Sequence[float]) -> Tensor:
    """``∂m/∂(reader input)`` for pairs ``sl``, averaged over the interpolation points ``alphas`` (α = 1: the clean
    run), as ``[n_readers, b, T, d]``. ``m`` is the chunk's share of the metric over all pairs, so summing chunks
    gives the gradient of the metric over all pairs. The points are folded into the batch axis. With a shared
    prefix the positions are the runner's ``p0..`` only."""
    g = runner.graph
    p0 = runner.p0
    tokens = runner.pairs.clean[sl]
    b, T = tokens.shape
    T -= p0
    A = len(alphas)
    x_clean = runner.clean_out[0, sl, p0:]
    x_abl = (runner.ablated[0] if runner.ablated.shape[1] == 1 else runner.ablated[0, sl])[:, p0:].expand_as(x_clean)
    al = torch.tensor(alphas, dtype=x_clean.dtype, device=x_clean.device)[:, None, None, None]
    x_in = einops.rearrange(x_abl[None] + al * (x_clean - x_abl)[None], "a b t d -> (a b) t d").detach()
    x_in.requires_grad_(True)  # the weights may be frozen: the graph must start at the input
    x = einops.repeat(tokens, "b t -> (a b) t", a=A)
    record: dict[int, Tensor] = {}
    with torch.enable_grad():
        out = runner.forward(x, runner.ablated, None, record=record, input_fn=lambda act: x_in.to(act.dtype),
                             pairs=_tile(sl, A, b))
        vals = runner.pair_values(out, _tile(sl, A, b))  # [1, A*b]
        loss = vals.sum() / (len(runner.pairs) * A)
        keys = sorted(record)
        grads = torch.autograd.grad(loss, [record[k] for k in keys], allow_unused=True)
    G = torch.zeros(g.n_readers, b, T, runner.engine.dims.d_model, dtype=runner.dtype, device=runner.engine.device)
    for k, gr in zip(keys, grads):
        if gr is None:
            continue
        gr = einops.rearrange(gr.to(runner.dtype), "(a b) t ... d -> a b t (...) d", a=A).sum(0)  # [b, t, n, d]
        G[k:k + gr.shape[2]] = einops.rearrange(gr, "b t n d -> n b t d")
    return G  # Σ over copies of 1/(n_pairs·A) ∂v/∂x: the mean over points, at the chunk's share of the metric


def _tile(sl: slice, A: int, b: int) -> Tensor:
    """Pair indices of A stacked copies of the chunk (so ``pair_values`` sees ``[1, A*b]`` pairs)."""
    return torch.arange(sl.start, sl.start + b).repeat(A)


def score_edges(model: Any, ctx: Any, method: Method = "eap-ig", steps: int = 5, *, points: Points = "left",
                ablation: Ablation = "counterfactual", graph: EdgeGraph | None = None, edges: Sequence[str] | None = None,
                max_tokens: int | None = None, progress: bool = False, runner: EdgeRunner | None = None,
                share_prefix: bool = True) -> EdgeScores:
    """Dense edge scores over the graph up to the probe's layer with ``method`` "eap", "eap-ig" (``steps``
    interpolation points, ``points`` rule) or "exact" (``edges`` limits exact patching to some edges).
    ``share_prefix`` computes the pairs' common prefix once (ignored when ``runner`` is given: its own setting)."""
    if method not in ("eap", "eap-ig", "exact"):
        raise ConfigError(f"method must be 'eap', 'eap-ig' or 'exact', got {method!r}.")
    runner = runner or EdgeRunner(model, ctx, graph, ablation=ablation, max_tokens=max_tokens, share_prefix=share_prefix)
    if method == "exact":
        return runner.exact_scores(edges, progress=progress)
    if edges is not None:
        raise ConfigError("edges= selects edges for exact patching only; EAP scores every edge in one pass.")
    alphas = [1.0] if method == "eap" else ig_alphas(steps, points)
    g = runner.graph
    if runner.clean_out is None:
        runner.clean_out = runner.run_outputs("clean")
    B, T = runner.pairs.clean.shape
    p0 = runner.p0
    T -= p0  # positions each forward runs
    budget = tokens_per_forward(runner.engine, g.n_writers, max_tokens=max_tokens, grad=True)
    pb = min(B, max(1, budget // (T * len(alphas))))
    A = len(alphas)
    # summed on the device, copied once (a copy per chunk would make each chunk's forward wait for the last)
    scores = torch.zeros(g.n_writers, g.n_readers, dtype=torch.float64, device=runner.engine.device)
    bar = progress_bar(total=B, desc=f"{method} scores", unit="pair", disable=not progress)
    for s0 in range(0, B, pb):
        sl = slice(s0, min(B, s0 + pb))
        if A * (sl.stop - sl.start) * T > budget and A > 1:  # fold fewer points per forward when pairs do not fit
            G = sum(reader_gradients(runner, sl, alphas[i:i + 1]) for i in range(A)) / A
        else:
            G = reader_gradients(runner, sl, alphas)
        abl = runner.ablated if runner.ablated.shape[1] == 1 else runner.ablated[:, sl]
        delta = einops.rearrange((abl - runner.clean_out[:, sl])[:, :, p0:], "w b t d -> w (b t d)")
        scores += (delta @ einops.rearrange(G, "r b t d -> (b t d) r")).double()
        bar.update(sl.stop - sl.start)
    bar.close()
    scores = scores.cpu()
    config = {"ablation": runner.ablation, "steps": A if method == "eap-ig" else 1, "alphas": alphas,
              "points": points if method == "eap-ig" else "clean"}
    return EdgeScores(g, scores, method, runner.ctx.metric.name, B, config)


__all__ = ["ig_alphas", "reader_gradients", "score_edges"]
