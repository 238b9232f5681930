"""Activation patching with the probe metric: short, named wrappers over :func:`patching.batched.run_patches`.

``direction="denoising"`` runs the corrupted prompts and patches in clean activations (1 = the patch
alone restores clean behaviour); ``"noising"`` runs the clean prompts and patches in corrupted ones
(values fall below 1 where the patch breaks the probe's reading).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from patching.batched import Patch, SweepCheckpoint, base_resid_names, run_patches
from patching.corruptions import PatchingPairs
from patching.metrics import MetricKind, ProbeMetric
from patching.results import EffectResult
from probing import hooks as H
from probing.engine import Engine, as_engine
from probing.errors import ConfigError
from probing.probe import WordIndexProbe

Direction = Literal["denoising", "noising"]


@dataclass
class PatchContext:
    """Everything a sweep needs, computed once: the base and source runs' caches and the calibrated metric."""

    engine: Engine
    pairs: PatchingPairs
    probe: WordIndexProbe
    metric: ProbeMetric
    direction: Direction
    base: Tensor
    source_cache: dict[str, Tensor]
    base_cache: dict[str, Tensor]
    stop_at_layer: int
    base_full: dict[str, Tensor] | None = None  # every head/MLP output of the base run (path patching)

    @property
    def layers(self) -> list[int]:
        return list(range(self.stop_at_layer))

    @property
    def max_target_pos(self) -> int:
        return int(self.pairs.target_pos[self.pairs.target_mask].max())

    @property
    def first_diff_pos(self) -> int:
        """The first position where any clean and corrupted prompt differ. Before it both runs are identical
        (causal attention), so patching there is exactly a no-op and is not run."""
        diff = (self.pairs.clean != self.pairs.corrupted).any(0).nonzero()
        return int(diff.min()) if len(diff) else self.max_target_pos + 1

    def sweep_positions(self) -> range:
        """Positions where a patch can change a target: from the first difference to the last target."""
        return range(self.first_diff_pos, self.max_target_pos + 1)

    def config(self, **extra: Any) -> dict[str, Any]:
        return {"model": self.engine.name, "probe_layer": self.probe.layer, "metric": self.metric.name,
                "direction": self.direction, "pairs": self.pairs.config, "n_pairs": len(self.pairs),
                "clean_value": self.metric.clean_value, "corrupted_value": self.metric.corrupted_value, **extra}


def check_probe(engine: Engine, probe: WordIndexProbe) -> int:
    """The probe's layer, after checking it was fitted on this model's residual stream."""
    probe.check_compatible(engine.name, d_model=engine.dims.d_model)
    if probe.layer is None:
        raise ConfigError("the probe does not record its layer; fit it with WordIndexProbe(layer=L) or load one "
                          "written by `wordpos probe`.")
    engine.dims.check_layer(int(probe.layer), "probe layer")
    if probe.site != "resid_post":
        raise ConfigError(f"patching reads the probe at resid_post; this probe reads {probe.site}.")
    return int(probe.layer)


@torch.no_grad()
def prepare(model: Any, pairs: PatchingPairs, probe: WordIndexProbe, *, metric: MetricKind = "logit_diff",
            direction: Direction = "denoising") -> PatchContext:
    """Cache the source run's activations at every site below the probe, the base run's residuals, and
    calibrate the metric on the clean and corrupted runs."""
    engine = as_engine(model)
    layer = check_probe(engine, probe)
    if direction not in ("denoising", "noising"):
        raise ConfigError(f"direction must be 'denoising' or 'noising', got {direction!r}.")
    if pairs.clean.shape[1] > engine.dims.n_ctx:
        raise ConfigError(f"the pairs are {pairs.clean.shape[1]} tokens long but the model's context is "
                          f"{engine.dims.n_ctx}; use fewer words.")
    pairs = pairs.to(engine.device)
    stop = layer + 1
    names = []
    for L in range(stop):
        names += [H.attn_z(L), H.resid(L, "resid_pre"), H.attn_out(L), H.mlp_out(L)]
    clean_out, clean_cache = engine.run(pairs.clean, cache=names, stop_at_layer=stop)
    corr_out, corr_cache = engine.run(pairs.corrupted, cache=names, stop_at_layer=stop)
    m = ProbeMetric(probe, pairs, kind=metric).calibrate(clean_out, corr_out)
    if direction == "denoising":
        base, source, base_cache = pairs.corrupted, clean_cache, corr_cache
    else:
        base, source, base_cache = pairs.clean, corr_cache, clean_cache
    base_cache = {k: v for k, v in base_cache.items() if k in base_resid_names(range(stop))}
    return PatchContext(engine, pairs, probe, m, direction, base, source, base_cache, stop)


def _run(ctx: PatchContext, patches: list[Patch], checkpoint_dir: str | Path | None, max_tokens: int | None, progress: bool,
         desc: str, **cfg: Any) -> Tensor:
    ckpt = SweepCheckpoint(checkpoint_dir, ctx.config(**cfg)) if checkpoint_dir else None
    return run_patches(ctx.engine, ctx.base, ctx.source_cache, ctx.base_cache, patches, ctx.metric,
                       stop_at_layer=ctx.stop_at_layer, max_tokens=max_tokens, checkpoint=ckpt, progress=progress,
                       desc=desc)


def _ctx(model: Any, pairs: PatchingPairs | PatchContext, probe: WordIndexProbe | None, metric: MetricKind,
         direction: Direction) -> PatchContext:
    if isinstance(pairs, PatchContext):
        return pairs
    if probe is None:
        raise ConfigError("pass the fitted probe (or a PatchContext from patching.prepare).")
    return prepare(model, pairs, probe, metric=metric, direction=direction)


def _unpatched_value(ctx: PatchContext) -> float:
    return 0.0 if ctx.direction == "denoising" else 1.0


def patch_heads(model: Any, pairs: PatchingPairs | PatchContext, probe: WordIndexProbe | None = None, *,
                by_pos: bool = False, heads: list[tuple[int, int]] | None = None, metric: MetricKind = "logit_diff",
                direction: Direction = "denoising", max_tokens: int | None = None, checkpoint_dir: str | Path | None = None,
                progress: bool = True) -> EffectResult:
    """Patch each attention head's output (``hook_z``) at all positions (axes ``layer, head``) or at each
    position (axes ``layer, head, pos``). Positions after the last target cannot reach it (causal
    attention), and positions before the first clean/corrupted difference hold identical activations in both
    runs: both keep the unpatched value without being run."""
    ctx = _ctx(model, pairs, probe, metric, direction)
    dims = ctx.engine.dims
    heads = heads if heads is not None else [(L, h) for L in ctx.layers for h in range(dims.n_heads)]
    for L, h in heads:
        dims.check_head(L, h)
    if not heads:
        raise ConfigError("the head list is empty; pass at least one (layer, head).")
    T = ctx.pairs.clean.shape[1]
    if by_pos:
        patches = [Patch("z", L, h, p) for L, h in heads for p in ctx.sweep_positions()]
    else:
        patches = [Patch("z", L, h) for L, h in heads]
    vals = _run(ctx, patches, checkpoint_dir, max_tokens, progress, "head patching", sweep="heads", by_pos=by_pos)
    shape = (ctx.stop_at_layer, dims.n_heads) + ((T,) if by_pos else ())
    effects = torch.full(shape, float("nan"), dtype=torch.float64)
    if by_pos:
        effects[[L for L, _ in heads], [h for _, h in heads], :] = _unpatched_value(ctx)
    for p, v in zip(patches, vals):
        effects[(p.layer, p.head) + ((p.pos,) if by_pos else ())] = v
    axes = ("layer", "head", "pos") if by_pos else ("layer", "head")
    return EffectResult(effects.numpy(), axes, "activation", ctx.metric.name, direction=ctx.direction,
                        n_prompts=len(ctx.pairs), config=ctx.config(sweep="heads", by_pos=by_pos))


def patch_resid(model: Any, pairs: PatchingPairs | PatchContext, probe: WordIndexProbe | None = None, *,
                metric: MetricKind = "logit_diff", direction: Direction = "denoising", max_tokens: int | None = None,
                checkpoint_dir: str | Path | None = None, progress: bool = True) -> EffectResult:
    """Patch the residual stream before each block at each position (axes ``layer, pos``)."""
    ctx = _ctx(model, pairs, probe, metric, direction)
    T = ctx.pairs.clean.shape[1]
    patches = [Patch("resid_pre", L, None, p) for L in ctx.layers for p in ctx.sweep_positions()]
    vals = _run(ctx, patches, checkpoint_dir, max_tokens, progress, "residual patching", sweep="resid")
    effects = torch.full((ctx.stop_at_layer, T), _unpatched_value(ctx), dtype=torch.float64)
    for p, v in zip(patches, vals):
        effects[p.layer, p.pos] = v
    return EffectResult(effects.numpy(), ("layer", "pos"), "activation", ctx.metric.name, direction=ctx.direction,
                        n_prompts=len(ctx.pairs), config=ctx.config(sweep="resid"))


def patch_layer_outputs(model: Any, pairs: PatchingPairs | PatchContext, probe: WordIndexProbe | None = None, *,
                        site: Literal["mlp_out", "attn_out"] = "mlp_out", metric: MetricKind = "logit_diff",
                        direction: Direction = "denoising", max_tokens: int | None = None, progress: bool = True) -> EffectResult:
    """Patch each block's whole MLP (or attention) output at all positions (axis ``layer``)."""
    ctx = _ctx(model, pairs, probe, metric, direction)
    patches = [Patch(site, L) for L in ctx.layers]
    vals = _run(ctx, patches, None, max_tokens, progress, f"{site} patching", sweep=site)
    return EffectResult(vals.numpy(), ("layer",), "activation", ctx.metric.name, direction=ctx.direction,
                        n_prompts=len(ctx.pairs), config=ctx.config(sweep=site))
