"""Path patching with the probe metric (Wang et al., 2022, adapted to a probe instead of logits).

* **Direct path** (sender → probe): the sender head's output is patched, every other attention head
  and every MLP downstream is frozen to its base-run value, so the only change that reaches the
  probe's residual stream is the sender's own write. Batched over senders.
* **Sender → receiver** through the receiver's query, key or value: step 1 runs the base prompts with
  the sender patched and all other heads frozen (MLPs recompute unless ``freeze_mlps``), and records
  the receiver's q/k/v; step 2 runs the base prompts with only the receiver's q/k/v replaced by the
  step-1 values and lets everything downstream recompute. Batched over (sender, receiver) pairs.

Grouped-query attention (Llama, SmolLM2): queries are per query head, but keys and values belong to a
key/value head shared by ``n_heads / n_kv_heads`` query heads. A k/v edge to receiver ``L.H`` therefore
patches the shared key/value head of ``H``'s group, and so changes every query head of that group; the
edge is reported on each query head of the group with the same value (``kv_group`` in the result).
"""

from __future__ import annotations

from typing import Any, Literal

import einops
import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from patching.activation import Direction, PatchContext, _ctx
from patching.batched import default_max_tokens
from patching.corruptions import PatchingPairs
from patching.metrics import MetricKind
from patching.results import EffectResult
from probing import hooks as H
from probing.errors import ConfigError
from probing.probe import WordIndexProbe

Via = Literal["q", "k", "v"]


def _freeze_hooks(ctx: PatchContext, P: int, from_layer: int, sender_layer: int, heads: Tensor, *,
                  freeze_mlps: bool, capture: dict[str, Tensor] | None = None, capture_names=()) -> list:
    """Hooks for P stacked copies: at ``sender_layer`` copy p gets head ``heads[p]`` from the source run;
    every other head at later layers is frozen to the base run; MLPs too when ``freeze_mlps``."""
    B = len(ctx.pairs)
    src_z = ctx.source_cache[H.attn_z(sender_layer)]
    hooks = []
    p_idx = torch.arange(P, device=src_z.device)

    def sender_hook(act: Tensor, name: str) -> Tensor:
        a = einops.rearrange(act, "(p b) t h d -> p b t h d", b=B).clone()
        a[p_idx, :, :, heads] = einops.rearrange(src_z[:, :, heads], "b t p d -> p b t d").to(a.dtype)
        return einops.rearrange(a, "p b t h d -> (p b) t h d")

    hooks.append((H.attn_z(sender_layer), sender_hook))
    for L in range(from_layer, ctx.stop_at_layer):
        if L > sender_layer:
            frozen = einops.repeat(ctx.base_full[H.attn_z(L)], "b ... -> (p b) ...", p=P)
            hooks.append((H.attn_z(L), lambda act, name, frozen=frozen: frozen.to(act.dtype)))
        if freeze_mlps and L >= sender_layer:
            frozen = einops.repeat(ctx.base_full[H.mlp_out(L)], "b ... -> (p b) ...", p=P)
            hooks.append((H.mlp_out(L), lambda act, name, frozen=frozen: frozen.to(act.dtype)))
    if capture is not None:
        for name in capture_names:
            hooks.append((name, lambda act, name: capture.__setitem__(name, act) or act))
    return hooks


def _base_full(ctx: PatchContext) -> dict[str, Tensor]:
    """The base run's head outputs and MLP outputs at every layer (for freezing), cached on the context."""
    if getattr(ctx, "base_full", None) is None:
        names = [n for L in ctx.layers for n in (H.attn_z(L), H.mlp_out(L))]
        names += [H.attn_qkv(L, w) for L in ctx.layers for w in "qkv"]
        with torch.no_grad():
            _, cache = ctx.engine.run(ctx.base, cache=names, stop_at_layer=ctx.stop_at_layer)
        ctx.base_full = cache
    return ctx.base_full


def _chunks(n: int, per: int):
    for i in range(0, n, per):
        yield slice(i, min(n, i + per))


@torch.no_grad()
def path_patch_direct(model: Any, pairs: PatchingPairs | PatchContext, probe: WordIndexProbe | None = None, *,
                      metric: MetricKind = "logit_diff", direction: Direction = "denoising",
                      max_tokens: int | None = None, progress: bool = True) -> EffectResult:
    """Effect of each head on the probe through the direct path only (axes ``layer, head``)."""
    ctx = _ctx(model, pairs, probe, metric, direction)
    _base_full(ctx)
    B, T = ctx.pairs.clean.shape
    n_heads = ctx.engine.dims.n_heads
    per = max(1, (max_tokens or default_max_tokens(ctx.engine)) // (B * T))
    effects = np.zeros((ctx.stop_at_layer, n_heads))
    bar = tqdm(total=ctx.stop_at_layer * n_heads, desc="path patching (direct)", unit="head", disable=not progress)
    for s in ctx.layers:
        for sl in _chunks(n_heads, per):
            heads = torch.arange(sl.start, sl.stop, device=ctx.engine.device)
            P = len(heads)
            hooks = _freeze_hooks(ctx, P, s, s, heads, freeze_mlps=True)
            x = einops.repeat(ctx.base_cache[H.resid(s, "resid_pre")], "b t d -> (p b) t d", p=P)
            resid, _ = ctx.engine.run(x, hooks=hooks, start_at_layer=s, stop_at_layer=ctx.stop_at_layer)
            effects[s, sl] = ctx.metric(resid).double().cpu().numpy()
            bar.update(P)
    bar.close()
    return EffectResult(effects, ("layer", "head"), "path", ctx.metric.name, direction=ctx.direction,
                        n_prompts=len(ctx.pairs), config=ctx.config(sweep="path_direct", freeze_mlps=True))


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
    receivers = receivers if receivers is not None else [(L, h) for L in range(1, L_stop) for h in range(n_heads)]
    senders = senders if senders is not None else [(L, h) for L in range(L_stop) for h in range(n_heads)]
    for L, h in list(receivers) + list(senders):
        dims.check_head(L, h)
        if L >= L_stop:
            raise ConfigError(f"head {L}.{h} is after the probe's layer {L_stop - 1}; it cannot affect the probe.")
    if not receivers or not senders:
        raise ConfigError("path patching needs at least one sender and one receiver head.")
    bad = [v for v in via if v not in ("q", "k", "v")]
    if bad:
        raise ConfigError(f"via must be a subset of q, k, v; got {bad}.")
    B, T = ctx.pairs.clean.shape
    per = max(1, (max_tokens or default_max_tokens(ctx.engine)) // (B * T))
    effects = np.full((L_stop, n_heads, L_stop, n_heads, len(via)), np.nan)
    recv_layers = sorted({L for L, _ in receivers})
    capture_names = [H.attn_qkv(L, w) for L in recv_layers for w in via]
    # step 1: for every sender, the receivers' q/k/v under "sender patched, all other heads frozen"
    step1: dict[tuple[int, int], dict[str, Tensor]] = {}
    by_layer: dict[int, list[int]] = {}
    for L, h in senders:
        by_layer.setdefault(L, []).append(h)
    bar = tqdm(total=len(senders), desc="path patching (step 1)", unit="sender", disable=not progress)
    for s, heads_s in sorted(by_layer.items()):
        if s >= max(recv_layers):
            bar.update(len(heads_s))
            continue
        for sl in _chunks(len(heads_s), per):
            heads = torch.tensor(heads_s[sl], device=ctx.engine.device)
            P = len(heads)
            cap: dict[str, Tensor] = {}
            hooks = _freeze_hooks(ctx, P, s, s, heads, freeze_mlps=freeze_mlps, capture=cap,
                                  capture_names=[n for n in capture_names if int(n.split(".")[1]) > s])
            x = einops.repeat(ctx.base_cache[H.resid(s, "resid_pre")], "b t d -> (p b) t d", p=P)
            ctx.engine.run(x, hooks=hooks, start_at_layer=s, stop_at_layer=max(recv_layers) + 1)
            for i, h in enumerate(heads.tolist()):
                step1[(s, h)] = {k: v[i * B:(i + 1) * B] for k, v in cap.items()}
            bar.update(P)
    bar.close()
    # step 2: the base run with only the receiver's q/k/v replaced; everything downstream recomputes
    jobs = [(s, r, w) for r in receivers for s in senders if s[0] < r[0] for w in via]
    bar = tqdm(total=len(jobs), desc="path patching (step 2)", unit="edge", disable=not progress)
    for r_layer in recv_layers:
        for w in via:
            name = H.attn_qkv(r_layer, w)
            layer_jobs = [(s, r) for (s, r, ww) in jobs if r[0] == r_layer and ww == w]
            for sl in _chunks(len(layer_jobs), per):
                chunk = layer_jobs[sl]
                P = len(chunk)
                n_slots = base_full[name].shape[2]  # n_heads for q, n_kv_heads for k/v under GQA
                slot = torch.tensor([r[1] if n_slots == n_heads else r[1] // group for _, r in chunk],
                                    device=ctx.engine.device)
                new = torch.stack([step1[s][name][:, :, int(k)] for (s, _), k in zip(chunk, slot.tolist())])
                p_idx = torch.arange(P, device=ctx.engine.device)

                def hook(act: Tensor, _name: str, new=new, slot=slot, p_idx=p_idx) -> Tensor:
                    a = einops.rearrange(act, "(p b) t h d -> p b t h d", b=B).clone()
                    a[p_idx, :, :, slot] = new.to(a.dtype)
                    return einops.rearrange(a, "p b t h d -> (p b) t h d")

                x = einops.repeat(ctx.base_cache[H.resid(r_layer, "resid_pre")], "b t d -> (p b) t d", p=P)
                resid, _ = ctx.engine.run(x, hooks=[(name, hook)], start_at_layer=r_layer, stop_at_layer=L_stop)
                vals = ctx.metric(resid).double().cpu().numpy()
                wi = via.index(w)
                for ((sL, sH), (rL, rH)), v in zip(chunk, vals):
                    effects[sL, sH, rL, rH, wi] = v
                bar.update(P)
    bar.close()
    return EffectResult(effects, ("sender_layer", "sender_head", "receiver_layer", "receiver_head", "via"), "path",
                        ctx.metric.name, coords={"via": list(via)}, direction=ctx.direction, n_prompts=len(ctx.pairs),
                        config=ctx.config(sweep="path_edges", freeze_mlps=freeze_mlps, kv_group=group))
