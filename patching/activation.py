"""Activation patching with the probe metric: short, named wrappers over :func:`patching.batched.run_patches`
(the one runner, :mod:`wordpos.patching.runner`).

``direction="denoising"`` runs the corrupted prompts (metric 0) and patches in clean activations: the change is
positive where the patch restores clean behaviour (+1 = fully). ``"noising"`` runs the clean prompts (metric 1)
and patches in corrupted ones: the change is negative where the patch breaks the probe's reading (−1 = fully).
Results store the change (patched − unpatched) and the levels in ``extra["level"]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from wordpos.patching.batched import Patch, SweepCheckpoint, base_resid_names, run_patches
from wordpos.patching.runner import cache_run
from wordpos.patching.sizing import Sizing
from wordpos.patching.corruptions import PatchingPairs
from wordpos.patching.heads import parse_heads
from wordpos.patching.metrics import MetricKind, ProbeMetric
from wordpos.patching.results import EffectResult
from wordpos.probing import hooks as H
from wordpos.probing.engines import Engine, as_engine
from wordpos.probing.errors import ConfigError
from wordpos.probing.probe import WordIndexProbe
from wordpos.probing.reprs import short_repr

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
    base_full_out: Tensor | None = None  # that run's residual at the probe's stop layer
    sizing: Sizing = Sizing()
    base_kv: Any = None  # the base run's keys/values at every position and layer (PrefixKV), when the engine allows
    base_out: Tensor | None = None  # the base run's residual at the probe's stop layer

    def skip_fields(self) -> dict[str, Any]:
        """Request fields that let the runner skip the positions a patch cannot change (``runner`` docstring):
        the base run's keys/values and output, and the first position where clean and corrupted differ."""
        if self.base_kv is None or self.base_out is None:
            return {}
        return {"kv": self.base_kv, "out": self.base_out, "same_before": self.first_diff_pos}

    @property
    def unpatched(self) -> float:
        """The normalised metric of the unpatched base run: 0 when denoising (corrupted), 1 when noising (clean)."""
        return float(self.metric.normalize(torch.tensor(self.metric.corrupted_value if self.direction == "denoising"
                                                        else self.metric.clean_value, dtype=torch.float64)))

    @property
    def layers(self) -> list[int]:
        return list(range(self.stop_at_layer))

    def __repr__(self) -> str:
        return short_repr(self, [f"model {self.engine.name!r} ({type(self.engine).__name__})",
                                 f"{len(self.pairs)} pairs", f"{self.direction} with {self.metric!r}",
                                 f"runs stop at layer {self.stop_at_layer}",
                                 f"cached: {len(self.source_cache)} source and {len(self.base_cache)} base activations"
                                 + ("" if self.base_kv is None else ", the base run's keys/values")])

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
                "clean_value": self.metric.clean_value, "corrupted_value": self.metric.corrupted_value,
                "unpatched": self.unpatched, **extra}


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
            direction: Direction = "denoising", sizing: Sizing | None = None,
            reuse_prefix: bool = True, full_base_cache: bool = False) -> PatchContext:
    """Cache the source run's activations at every site below the probe, the base run's residuals, and
    calibrate the metric on the clean and corrupted runs.

    ``reuse_prefix`` (default, where the engine allows it: TransformerLens bridges over decoder-only models, and
    decoder-only models that nnsight runs locally) also
    keeps the base run's keys/values, so patched forwards recompute only the positions from the patch on (from the
    first clean/corrupted difference for whole-position patches); the results are the same up to float rounding.
    ``full_base_cache`` keeps every cached site of the base run too, not only its residuals: the edge runner then
    takes both runs' writer outputs from the context instead of running the prompts again."""
    if not isinstance(pairs, PatchingPairs):
        raise ConfigError(f"pairs must be PatchingPairs from wordpos.patching.make_pairs(model.tokenizer, n_pairs, "
                          f"vocab=data.vocab), got {type(pairs).__name__}.")
    if not isinstance(probe, WordIndexProbe):
        raise ConfigError(f"probe must be a fitted WordIndexProbe, got {type(probe).__name__}.")
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
    sizing = sizing or Sizing()
    keep_base = names if full_base_cache else base_resid_names(range(stop))
    b = 1 if direction == "denoising" else 0  # the base run: corrupted when denoising, clean when noising
    from wordpos.probing.engines.split_inputs import cached_runs, prefix_kv_unsupported

    kv = None
    if reuse_prefix and prefix_kv_unsupported(engine) is None:
        # the clean and corrupted runs stacked in one batch, the base run's keys/values kept from the same forward
        rows = sizing.tokens_per_forward(engine.device) // max(1, pairs.clean.shape[1])
        outs, caches, kv = cached_runs(engine, [pairs.clean, pairs.corrupted], names, stop, rows,
                                       keep=[keep_base if g == b else names for g in (0, 1)], kv_group=b)
        (clean_out, corr_out), (clean_cache, corr_cache) = outs, caches
    else:
        clean_out, clean_cache = cache_run(engine, pairs.clean, names, stop_at_layer=stop, sizing=sizing)
        corr_out, corr_cache = cache_run(engine, pairs.corrupted, names, stop_at_layer=stop, sizing=sizing)
    m = ProbeMetric(probe, pairs, kind=metric).calibrate(clean_out, corr_out)
    if direction == "denoising":
        base, source, base_cache = pairs.corrupted, clean_cache, corr_cache
    else:
        base, source, base_cache = pairs.clean, corr_cache, clean_cache
    keep = set(keep_base)
    base_cache = {k: v for k, v in base_cache.items() if k in keep}
    ctx = PatchContext(engine, pairs, probe, m, direction, base, source, base_cache, stop, sizing=sizing)
    if kv is not None:
        ctx.base_kv, ctx.base_out = kv, (corr_out if direction == "denoising" else clean_out)
    return ctx


def _run(ctx: PatchContext, patches: list[Patch], checkpoint_dir: str | Path | None, max_tokens: int | None, progress: bool,
         desc: str, **cfg: Any) -> Tensor:
    ckpt = SweepCheckpoint(checkpoint_dir, ctx.config(**cfg)) if checkpoint_dir else None
    return run_patches(ctx.engine, ctx.base, ctx.source_cache, ctx.base_cache, patches, ctx.metric,
                       stop_at_layer=ctx.stop_at_layer, max_tokens=max_tokens, sizing=ctx.sizing, checkpoint=ckpt,
                       progress=progress, desc=desc, skip=ctx.skip_fields())


def _weights_id(engine: Any) -> tuple[int, tuple[int, ...]] | None:
    """Where an engine's first floating weight lives (engines that share weights, e.g. an nnsight engine made from a
    bridge, share it), or None where there are none here (a remote model)."""
    module = getattr(engine, "model", engine)
    module = getattr(module, "_module", module)
    try:
        w = next(p for p in module.parameters() if p.is_floating_point())
    except (AttributeError, StopIteration, TypeError):
        return None
    return w.data_ptr(), tuple(w.shape)


def check_context_model(model: Any, ctx: PatchContext) -> None:
    """Refuse a ``model`` that is not the one ``ctx`` was prepared on: a context carries its model's base runs and
    engine, so the other model's numbers would mix with them silently."""
    if model is None or model is ctx.engine or model is getattr(ctx.engine, "model", None):
        return
    try:
        engine = as_engine(model)
    except TypeError as e:
        raise ConfigError(f"{e}; pass the loaded model the context was prepared on (or None to use the context's)."
                          ) from None
    a, b = _weights_id(engine), _weights_id(ctx.engine)
    if a is not None and b is not None and a != b:
        raise ConfigError(f"the model passed is not the one this patching context was prepared on "
                          f"({getattr(ctx.engine, 'name', 'another model')!r}); pass that model, or prepare a context "
                          "for this one with wordpos.patching.prepare(model, pairs, probe).")


def _ctx(model: Any, pairs: PatchingPairs | PatchContext, probe: WordIndexProbe | None, metric: MetricKind,
         direction: Direction) -> PatchContext:
    if isinstance(pairs, PatchContext):
        check_context_model(model, pairs)
        return pairs
    if probe is None:
        raise ConfigError("pass the fitted probe (or a PatchContext from wordpos.patching.prepare).")
    return prepare(model, pairs, probe, metric=metric, direction=direction)


def change_result(levels: torch.Tensor | Any, ctx: PatchContext, axes: tuple[str, ...], method: str,
                  **config: Any) -> EffectResult:
    """An :class:`EffectResult` of signed changes (levels − unpatched), the levels kept in ``extra["level"]``."""
    levels = torch.as_tensor(levels, dtype=torch.float64).numpy()
    return EffectResult(levels - ctx.unpatched, axes, method, ctx.metric.name, direction=ctx.direction,
                        n_prompts=len(ctx.pairs), config=ctx.config(**config), extra={"level": levels})


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
    if heads is not None:
        heads = parse_heads(heads, dims, keep_order=True)  # (checked against dims there)
    else:
        heads = [(L, h) for L in ctx.layers for h in range(dims.n_heads)]
    T = ctx.pairs.clean.shape[1]
    if by_pos:
        patches = [Patch("z", L, h, p) for L, h in heads for p in ctx.sweep_positions()]
    else:
        patches = [Patch("z", L, h) for L, h in heads]
    vals = _run(ctx, patches, checkpoint_dir, max_tokens, progress, "head patching", sweep="heads", by_pos=by_pos)
    shape = (ctx.stop_at_layer, dims.n_heads) + ((T,) if by_pos else ())
    levels = torch.full(shape, float("nan"), dtype=torch.float64)  # heads not asked for: not measured
    if by_pos:  # positions that cannot change a target keep the unpatched level exactly (see above)
        levels[[L for L, _ in heads], [h for _, h in heads], :] = ctx.unpatched
    for p, v in zip(patches, vals):
        levels[(p.layer, p.head) + ((p.pos,) if by_pos else ())] = v
    axes = ("layer", "head", "pos") if by_pos else ("layer", "head")
    return change_result(levels, ctx, axes, "activation", sweep="heads", by_pos=by_pos)


def patch_resid(model: Any, pairs: PatchingPairs | PatchContext, probe: WordIndexProbe | None = None, *,
                metric: MetricKind = "logit_diff", direction: Direction = "denoising", max_tokens: int | None = None,
                checkpoint_dir: str | Path | None = None, progress: bool = True) -> EffectResult:
    """Patch the residual stream before each block at each position (axes ``layer, pos``)."""
    ctx = _ctx(model, pairs, probe, metric, direction)
    T = ctx.pairs.clean.shape[1]
    patches = [Patch("resid_pre", L, None, p) for L in ctx.layers for p in ctx.sweep_positions()]
    vals = _run(ctx, patches, checkpoint_dir, max_tokens, progress, "residual patching", sweep="resid")
    levels = torch.full((ctx.stop_at_layer, T), ctx.unpatched, dtype=torch.float64)
    for p, v in zip(patches, vals):
        levels[p.layer, p.pos] = v
    return change_result(levels, ctx, ("layer", "pos"), "activation", sweep="resid")


def patch_layer_outputs(model: Any, pairs: PatchingPairs | PatchContext, probe: WordIndexProbe | None = None, *,
                        site: Literal["mlp_out", "attn_out"] = "mlp_out", by_pos: bool = False,
                        metric: MetricKind = "logit_diff", direction: Direction = "denoising",
                        max_tokens: int | None = None, progress: bool = True) -> EffectResult:
    """Patch each block's whole MLP (or attention) output at all positions (axis ``layer``), or at each position
    (axes ``layer, pos``; positions that cannot change a target keep the unpatched level without being run)."""
    ctx = _ctx(model, pairs, probe, metric, direction)
    if by_pos:
        T = ctx.pairs.clean.shape[1]
        patches = [Patch(site, L, None, p) for L in ctx.layers for p in ctx.sweep_positions()]
        vals = _run(ctx, patches, None, max_tokens, progress, f"{site} patching", sweep=site, by_pos=True)
        levels = torch.full((ctx.stop_at_layer, T), ctx.unpatched, dtype=torch.float64)
        for p, v in zip(patches, vals):
            levels[p.layer, p.pos] = v
        return change_result(levels, ctx, ("layer", "pos"), "activation", sweep=site, by_pos=True)
    patches = [Patch(site, L) for L in ctx.layers]
    vals = _run(ctx, patches, None, max_tokens, progress, f"{site} patching", sweep=site)
    return change_result(vals, ctx, ("layer",), "activation", sweep=site)
