"""Path patching with the probe metric (Wang et al., 2022, adapted to a probe instead of logits).

* **Direct path** (sender → probe): the sender head's output is patched, every other attention head
  and every MLP downstream is frozen to its base-run value, so the only change that reaches the
  probe's residual stream is the sender's own write. With everything else frozen that residual is the base
  run's plus ``Δz_h · W_O[h]`` (the probe reads the residual stream itself, no norm), so on engines that expose
  ``W_O`` it is computed in that closed form, without a forward per sender (``route="closed_form"``, the
  default); ``route="forward"`` runs the frozen forwards through the runner, batched over senders.
* **Sender → receiver** through the receiver's query, key or value: step 1 runs the base prompts with
  the sender patched and all other heads frozen (MLPs recompute unless ``freeze_mlps``), and records
  the receiver's q/k/v; step 2 runs the base prompts with only the receiver's q/k/v replaced by the
  step-1 values and lets everything downstream recompute. Batched over (sender, receiver) pairs.

Grouped-query attention (Llama, SmolLM2): queries are per query head, but keys and values belong to a
key/value head shared by ``n_heads / n_kv_heads`` query heads. A k/v edge to receiver ``L.H`` therefore
patches the shared key/value head of ``H``'s group, and so changes every query head of that group; the
edge is reported on each query head of the group with the same value (``kv_group`` in the result).

Every run is data for the one runner (:mod:`wordpos.patching.runner`): a sender patch is a ``source`` edit, the
frozen heads and MLPs are ``base`` edits, the step-2 receiver input is a ``value`` edit. Results are signed changes
from the unpatched run; the levels are in ``extra["level"]``.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import einops
import numpy as np
import torch
from torch import Tensor

from wordpos.patching.activation import Direction, PatchContext, _ctx
from wordpos.patching.corruptions import PatchingPairs
from wordpos.patching.heads import parse_heads
from wordpos.patching.metrics import MetricKind
from wordpos.patching.results import EffectResult
from wordpos.patching.runner import Edit, Intervention, Request, _layer_of, cache_run, run_interventions
from wordpos.probing import hooks as H
from wordpos.probing.errors import ConfigError
from wordpos.probing.probe import WordIndexProbe

Via = Literal["q", "k", "v"]
log = logging.getLogger(__name__)


def _path_edits(ctx: PatchContext, sender: tuple[int, int], *, freeze_mlps: bool) -> tuple[Edit, ...]:
    """Sender ``L.h`` from the source run; every head of later layers frozen to the base run, and the MLPs from
    the sender's layer on when ``freeze_mlps``."""
    s, h = sender
    edits = [Edit(H.attn_z(s), "source", h)]
    for L in range(s, ctx.stop_at_layer):
        if L > s:
            edits.append(Edit(H.attn_z(L), "base"))
        if freeze_mlps:
            edits.append(Edit(H.mlp_out(L), "base"))
    return tuple(edits)


def _base_full(ctx: PatchContext) -> dict[str, Tensor]:
    """The base run's head outputs, MLP outputs and q/k/v at every layer (for freezing), cached on the context with
    its output at the probe's layer (``ctx.base_full_out``)."""
    if getattr(ctx, "base_full", None) is None:
        names = [n for L in ctx.layers for n in (H.attn_z(L), H.mlp_out(L))]
        names += [H.attn_qkv(L, w) for L in ctx.layers for w in "qkv"]
        ctx.base_full_out, ctx.base_full = cache_run(ctx.engine, ctx.base, names, stop_at_layer=ctx.stop_at_layer,
                                                     sizing=ctx.sizing)
    return ctx.base_full


def _resid_in(ctx: PatchContext) -> dict[int, Tensor]:
    return {L: ctx.base_cache[H.resid(L, "resid_pre")] for L in ctx.layers}


def _metric_reader(ctx: PatchContext):
    return lambda out, cache, P, sl: ctx.metric(out).detach().double()  # (on the device: the caller copies once)


def _frozen_request(ctx: PatchContext, base_full: dict[str, Tensor], read: Any) -> Request:
    """The request of direct-path forwards: senders from the source run, everything they freeze from the base run."""
    return Request(tokens=ctx.base, read=read, stop_at_layer=ctx.stop_at_layer, resid=_resid_in(ctx),
                   source=ctx.source_cache, base=base_full, **ctx.skip_fields())


@torch.no_grad()
def path_patch_direct(model: Any, pairs: PatchingPairs | PatchContext, probe: WordIndexProbe | None = None, *,
                      metric: MetricKind = "logit_diff", direction: Direction = "denoising",
                      max_tokens: int | None = None, progress: bool = True,
                      route: Literal["closed_form", "forward"] = "closed_form") -> EffectResult:
    """Effect of each head on the probe through the direct path only (axes ``layer, head``).

    ``route``: ``"closed_form"`` (base residual + ``Δz_h · W_O[h]``, one probe reading per head; the frozen
    forward on engines without ``W_O``) or ``"forward"`` (the frozen forwards, through the runner). The same
    numbers up to rounding (tested in float64); the route taken is ``config["route"]``."""
    if route not in ("closed_form", "forward"):
        raise ConfigError(f"route={route!r} is not one of 'closed_form', 'forward'.")
    ctx = _ctx(model, pairs, probe, metric, direction)
    n_heads = ctx.engine.dims.n_heads
    senders = [(s, h) for s in ctx.layers for h in range(n_heads)]
    vals = _direct_closed_form(ctx, max_tokens) if route == "closed_form" else None
    if vals is None:
        ivs = [Intervention(_path_edits(ctx, sd, freeze_mlps=True), start_layer=sd[0], label=f"{sd[0]}.{sd[1]}")
               for sd in senders]
        req = _frozen_request(ctx, _base_full(ctx), _metric_reader(ctx))
        vals = run_interventions(ctx.engine, req, ivs, sizing=ctx.sizing, max_tokens=max_tokens, progress=progress,
                                 desc="path patching (direct)", unit="head").cpu()
        route = "forward"
    levels = np.full((ctx.stop_at_layer, n_heads), np.nan)
    for (s, h), v in zip(senders, vals.numpy()):
        levels[s, h] = v
    return EffectResult(levels - ctx.unpatched, ("layer", "head"), "path", ctx.metric.name, direction=ctx.direction,
                        n_prompts=len(ctx.pairs), config=ctx.config(sweep="path_direct", freeze_mlps=True, route=route),
                        extra={"level": levels})


def _direct_closed_form(ctx: PatchContext, max_tokens: int | None) -> Tensor | None:
    """The normalised metric of every direct path, layer-major (``[n_layers * n_heads]``), as the base run's
    residual at the probe's layer plus the sender's write ``Δz_h · W_O[h]``. None (the caller runs the frozen
    forwards) when the engine has no ``W_O``, or when the head with the largest write, run as a frozen forward,
    does not land where the closed form puts it (an architecture whose attention output is not ``z · W_O`` added
    to the residual stream, e.g. a norm after attention)."""
    from wordpos.patching.edge_runner import route_tolerance
    from wordpos.probing.engines.split_inputs import head_out_weights

    try:
        W_O = head_out_weights(ctx.engine, ctx.stop_at_layer)  # [layer, head, d_head, d_model]
    except ConfigError:
        return None
    base_z = _base_full(ctx)
    base_out = ctx.base_out if ctx.base_out is not None else ctx.base_full_out
    N, T, n_heads = int(base_out.shape[0]), int(base_out.shape[1]), ctx.engine.dims.n_heads
    budget = max_tokens or ctx.sizing.tokens_per_forward(ctx.engine.device)
    per = max(1, min(n_heads, budget // (N * T)))  # heads per reading, as many tokens as a forward holds
    vals, sizes = [], []
    for s in ctx.layers:
        name = H.attn_z(s)
        dz = ctx.source_cache[name].to(base_out) - base_z[name].to(base_out)  # [N, T, head, d_head]
        for h0 in range(0, n_heads, per):
            hs = slice(h0, min(n_heads, h0 + per))
            write = torch.einsum("nthd,hdm->hntm", dz[:, :, hs], W_O[s, hs].to(base_out))
            vals.append(ctx.metric(einops.rearrange(base_out.unsqueeze(0) + write, "h n t m -> (h n) t m")).detach())
            sizes.append(write.norm(dim=-1).amax(dim=(1, 2)))  # each head's largest write at any position
    sizes = torch.cat(sizes)
    f = int(sizes.argmax())  # the check: the frozen forward of the head with the largest write, through the runner
    s, h, size = f // n_heads, f % n_heads, float(sizes[f])
    if size > 0:
        name = H.attn_z(s)
        dz = ctx.source_cache[name][:, :, h].to(base_out) - base_z[name][:, :, h].to(base_out)
        closed = base_out + dz @ W_O[s, h].to(base_out)
        req = _frozen_request(ctx, base_z, lambda out, cache, P, sl: einops.rearrange(out, "(p b) t m -> p b t m", p=P))
        iv = Intervention(_path_edits(ctx, (s, h), freeze_mlps=True), start_layer=s)
        ref = run_interventions(ctx.engine, req, [iv], sizing=ctx.sizing, max_tokens=max_tokens, progress=False)[0]
        # allowed per position: the route tolerance of the write, plus the forward's own rounding, which grows with
        # the residual it re-adds over the layers after the sender (bfloat16: ~1e-2 of the residual)
        err = (closed.double() - ref.double()).norm(dim=-1)
        eps = torch.finfo(ref.dtype).eps
        depth = (ctx.stop_at_layer - s) ** 0.5
        allowed = route_tolerance(ref.dtype) * size + 4 * eps * depth * ref.double().norm(dim=-1)
        if bool((err > allowed).any()):
            worst = float((err / allowed).max())
            log.warning("direct path patching: head %d.%d's frozen forward differs from base + dz W_O by %.1f times "
                        "what rounding explains (largest write %.2e); the attention output may not be z W_O added to "
                        "the residual stream. Running every sender's frozen forward instead", s, h, worst, size)
            return None
    return torch.cat(vals).double().cpu()


@torch.no_grad()
def path_patch_edges(model: Any, pairs: PatchingPairs | PatchContext, probe: WordIndexProbe | None = None, *,
                     receivers: list[tuple[int, int]] | None = None, senders: list[tuple[int, int]] | None = None,
                     via: tuple[Via, ...] = ("q", "k", "v"), metric: MetricKind = "logit_diff",
                     direction: Direction = "denoising", freeze_mlps: bool = False, max_tokens: int | None = None,
                     progress: bool = True) -> EffectResult:
    """Effect on the probe of each sender → receiver path through the receiver's q, k or v.

    Axes ``sender_layer, sender_head, receiver_layer, receiver_head, via``; pairs where the sender is
    not before the receiver are NaN. ``receivers`` defaults to every head below the probe layer
    except layer 0; ``senders`` to every head."""
    ctx = _ctx(model, pairs, probe, metric, direction)
    base_full = _base_full(ctx)
    dims = ctx.engine.dims
    L_stop, n_heads = ctx.stop_at_layer, dims.n_heads
    group = n_heads // dims.n_kv_heads
    def heads_of(spec: Any, default: list[tuple[int, int]]) -> list[tuple[int, int]]:
        return default if spec is None else [] if len(spec) == 0 else parse_heads(spec, dims, keep_order=True)

    receivers = heads_of(receivers, [(L, h) for L in range(1, L_stop) for h in range(n_heads)])
    senders = heads_of(senders, [(L, h) for L in range(L_stop) for h in range(n_heads)])
    for L, h in list(receivers) + list(senders):
        dims.check_head(L, h)
        if L >= L_stop:
            raise ConfigError(f"head {L}.{h} is after the probe's layer {L_stop - 1}; it cannot affect the probe.")
    if not receivers or not senders:
        raise ConfigError("path patching needs at least one sender and one receiver head.")
    bad = [v for v in via if v not in ("q", "k", "v")]
    if bad:
        raise ConfigError(f"via must be a subset of q, k, v; got {bad}.")
    effects = np.full((L_stop, n_heads, L_stop, n_heads, len(via)), np.nan)
    recv_layers = sorted({L for L, _ in receivers})
    resid_in = _resid_in(ctx)
    # step 1: for every sender, the receivers' q/k/v under "sender patched, all other heads frozen"; one runner
    # call per sender layer (the q/k/v read back are those of the later receiver layers)
    step1: dict[str, Tensor] = {}
    for s in sorted({L for L, _ in senders}):
        names = [H.attn_qkv(L, w) for L in recv_layers if L > s for w in via]
        if not names:
            continue
        heads_s = [(L, h) for L, h in senders if L == s]
        stop1 = max(recv_layers) + 1  # step 1 reads the receivers' q/k/v: freezing later layers changes nothing
        ivs = [Intervention(tuple(e for e in _path_edits(ctx, sd, freeze_mlps=freeze_mlps)
                                  if not e.hook.startswith("blocks.") or _layer_of(e.hook) < stop1),
                            start_layer=s, label=f"{s}.{sd[1]}")
               for sd in heads_s]
        req = Request(tokens=ctx.base, read=lambda out, cache, P, sl, names=names: {
            n: einops.rearrange(cache[n], "(p b) ... -> p b ...", p=P) for n in names},
            stop_at_layer=stop1, resid=resid_in, source=ctx.source_cache, base=base_full, cache=names)
        got = run_interventions(ctx.engine, req, ivs, sizing=ctx.sizing, max_tokens=max_tokens, progress=progress,
                                desc=f"path patching (step 1, senders of layer {s})", unit="sender")
        for i, (L, h) in enumerate(heads_s):
            for n in names:
                step1[f"{L}.{h}|{n}"] = got[n][i]
    # step 2: the base run with only the receiver's q/k/v replaced; everything downstream recomputes
    jobs = [(sd, r, w) for r in receivers for sd in senders if sd[0] < r[0] for w in via]
    ivs = []
    for (sL, sH), (rL, rH), w in jobs:
        name = H.attn_qkv(rL, w)
        n_slots = base_full[name].shape[2]  # n_heads for q, n_kv_heads for k/v under GQA
        slot = rH if n_slots == n_heads else rH // group
        ivs.append(Intervention((Edit(name, "value", slot, value=f"{sL}.{sH}|{name}"),), start_layer=rL,
                                label=f"{sL}.{sH}->{rL}.{rH}.{w}"))
    if ivs:
        # step 1 changed nothing before the first clean/corrupted difference (its sender's source equals the base
        # run there), so its q/k/v equal the base run's there and step 2 runs only the positions after (checked)
        skip = ctx.skip_fields()
        if skip and not _same_before(step1, base_full, ctx.first_diff_pos):
            log.warning("path patching: step 1's q/k/v differ from the base run's before the first clean/corrupted "
                        "difference; step 2 runs whole prompts")
            skip = {}
        req = Request(tokens=ctx.base, read=_metric_reader(ctx), stop_at_layer=L_stop, resid=resid_in, values=step1,
                      values_same_before=bool(skip), **skip)
        vals = run_interventions(ctx.engine, req, ivs, sizing=ctx.sizing, max_tokens=max_tokens, progress=progress,
                                 desc="path patching (step 2)", unit="edge").cpu().numpy()
        for ((sL, sH), (rL, rH), w), v in zip(jobs, vals):
            effects[sL, sH, rL, rH, via.index(w)] = v
    return EffectResult(effects - ctx.unpatched, ("sender_layer", "sender_head", "receiver_layer", "receiver_head",
                                                  "via"), "path",
                        ctx.metric.name, coords={"via": list(via)}, direction=ctx.direction, n_prompts=len(ctx.pairs),
                        config=ctx.config(sweep="path_edges", freeze_mlps=freeze_mlps, kv_group=group),
                        extra={"level": effects})


def _same_before(step1: dict[str, Tensor], base_full: dict[str, Tensor], p0: int) -> bool:
    """Whether every recorded step-1 value equals the base run's at the positions before ``p0`` (within the float
    tolerance of the shortcut routes), as :class:`Request` ``values_same_before`` promises the runner."""
    from wordpos.patching.edge_runner import route_tolerance

    for key, v in step1.items():
        ref = base_full[key.split("|", 1)[1]][:, :p0].to(v)
        if float((v[:, :p0] - ref).abs().max()) > route_tolerance(v.dtype) * max(float(ref.abs().max()), 1e-12):
            return False
    return True
