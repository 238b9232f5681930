"""Attribution patching (Nanda, 2023; Syed et al., 2023): the first-order approximation of activation
patching for every head and position from one forward and one backward pass.

``change ≈ Σ (a_source − a_base) · ∂metric/∂a`` at the base run, with the normalised probe metric
(1 = clean, 0 = corrupted); the estimated level (unpatched + change) is kept in ``extra["level"]``. Exact for a linear path, an approximation through attention and LayerNorm:
compare it with :func:`patching.activation.patch_heads` (:func:`correlation`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from wordpos.patching.activation import Direction, PatchContext, _ctx
from wordpos.patching.corruptions import PatchingPairs
from wordpos.patching.metrics import MetricKind
from wordpos.patching.results import EffectResult
from wordpos.patching.runner import cache_run
from wordpos.probing import hooks as H
from wordpos.probing.errors import ConfigError
from wordpos.probing.probe import WordIndexProbe


def _gradients(ctx: PatchContext, names: list[str]) -> dict[str, Tensor]:
    """∂metric/∂activation at the base run, for each hook name (one forward, one backward)."""
    deltas: dict[str, Tensor] = {}

    def add_delta(act: Tensor, name: str) -> Tensor:
        d = torch.zeros_like(act, requires_grad=True)
        deltas[name] = d
        return act + d

    with torch.enable_grad():
        resid, _ = ctx.engine.run(ctx.base, hooks=[(n, add_delta) for n in names], stop_at_layer=ctx.stop_at_layer)
        if ctx.metric.kind == "accuracy":
            raise ConfigError("attribution patching needs a differentiable metric: use logit_diff or projection.")
        ctx.metric(resid).sum().backward()
    return {n: d.grad.detach() for n, d in deltas.items()}


def attribute_heads(model: Any, pairs: PatchingPairs | PatchContext, probe: WordIndexProbe | None = None, *,
                    by_pos: bool = False, metric: MetricKind = "logit_diff",
                    direction: Direction = "denoising") -> EffectResult:
    """Attribution estimate of patching each head's ``hook_z`` (axes ``layer, head`` or ``layer, head, pos``)."""
    ctx = _ctx(model, pairs, probe, metric, direction)
    names = [H.attn_z(L) for L in ctx.layers]
    grads = _gradients(ctx, names)
    _, base = cache_run(ctx.engine, ctx.base, names, stop_at_layer=ctx.stop_at_layer, sizing=ctx.sizing)
    per = []
    for n in names:
        diff = ctx.source_cache[n] - base[n]  # [batch, pos, head, d_head]
        per.append(torch.einsum("bthd,bthd->ht", diff, grads[n]))
    contrib = torch.stack(per).double().cpu().numpy()  # [layer, head, pos]
    # each estimate is the first-order change of its own patch
    change = contrib if by_pos else contrib.sum(-1)
    axes = ("layer", "head", "pos") if by_pos else ("layer", "head")
    return EffectResult(change, axes, "attribution", ctx.metric.name, direction=ctx.direction,
                        n_prompts=len(ctx.pairs), config=ctx.config(sweep="attribution_heads", by_pos=by_pos),
                        extra={"level": change + ctx.unpatched})


def attribute_resid(model: Any, pairs: PatchingPairs | PatchContext, probe: WordIndexProbe | None = None, *,
                    metric: MetricKind = "logit_diff", direction: Direction = "denoising") -> EffectResult:
    """Attribution estimate of patching the residual stream before each block at each position."""
    ctx = _ctx(model, pairs, probe, metric, direction)
    names = [H.resid(L, "resid_pre") for L in ctx.layers]
    grads = _gradients(ctx, names)
    eff = [torch.einsum("btd,btd->t", ctx.source_cache[n] - ctx.base_cache[n], grads[n]) for n in names]
    change = torch.stack(eff).double().cpu().numpy()
    return EffectResult(change, ("layer", "pos"), "attribution", ctx.metric.name, direction=ctx.direction,
                        n_prompts=len(ctx.pairs), config=ctx.config(sweep="attribution_resid"),
                        extra={"level": change + ctx.unpatched})


def correlation(a: EffectResult, b: EffectResult) -> float:
    """Pearson correlation of two effect arrays over their common (finite) entries."""
    x, y = np.asarray(a.effects).ravel(), np.asarray(b.effects).ravel()
    if x.shape != y.shape:
        raise ConfigError(f"cannot correlate effects of shapes {a.effects.shape} and {b.effects.shape}.")
    ok = np.isfinite(x) & np.isfinite(y)
    return float(np.corrcoef(x[ok], y[ok])[0, 1])
