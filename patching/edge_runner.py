"""Edge-level interventions: evaluate any set of edges in one patched forward per batch.

Semantics (MIB / EAP-IG, auto-circuit's patch mask): run the clean prompt; every edge ``(w, r)`` *outside* the
circuit carries the ablated value of its writer instead of its actual one, i.e. at each reader

    reader_input = actual_input − Σ_{w: (w, r) ∉ C} (out_w − ablated_w)

where ``out_w`` is the writer's output *in this patched run* (so a writer whose own inputs were ablated passes the
change on only through edges inside the circuit). Writers: the residual entering layer 0 (``input``), each head's
``z_h @ W_O[h]``, each MLP's output. Readers: each head's q input, each key/value head's k and v inputs (split,
pre-norm: :mod:`wordpos.probing.engines.split_inputs`), each MLP's input and the probe's residual stream. The
difference tensor ``D[c, w] = out_w − ablated_w`` fills up as the forward runs, and each reader subtracts
``einsum(1 − mask[c, :, r], D[c])`` over the writers before it (a dense mask, one batched matmul per reader group).

Ablations: ``counterfactual`` (default: the corrupted prompt's writer outputs), ``mean`` (each writer's output
averaged over a reference set of prompts, per position; default reference: the clean and corrupted prompts),
``resample`` (another pair's clean writer outputs, a seeded derangement).

Several circuits run in one forward by folding them into the batch axis; one chunking rule
(:func:`tokens_per_forward`) bounds the tokens per forward (CPU vs accelerator) and the difference buffer.

Shared prefix (``share_prefix=True``, the default where the engine allows it): before the first position ``p0``
where the pairs differ (clean vs corrupted; for mean and resample ablation also across pairs and the reference
set) every writer's output is the same in the clean run and the ablated one, so every edge correction is zero
there and no circuit can change those positions (causal attention; for mean ablation the mean of identical
values equals them up to rounding: ≤ 1e-5 normalised on SmolLM2). Their keys and values are computed once
per pair (:func:`~wordpos.probing.engines.split_inputs.run_prefix`) and every patched forward runs only
positions ``p0..T-1`` on top of them. Targets before ``p0`` shorten the prefix. When the engine cannot
(e.g. nnsight) or a start-up check on two pairs does not reproduce the full-prompt run, the runner falls back to
full prompts and logs why (``runner.prefix_reason``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import einops
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from wordpos.patching.corruptions import derangement  # the one resampling rule: no prompt keeps its own
from wordpos.patching.edge_graph import EdgeGraph, EdgeScores
from wordpos.patching.sizing import Sizing
from wordpos.probing import hooks as H
from wordpos.probing.engines import Engine, as_engine
from wordpos.probing.engines.lean import LeanBlocks, lean_unsupported
from wordpos.probing.engines.split_inputs import (PrefixKV, head_out_weights, prefix_kv_unsupported, reader_hook,
                                                  run_prefix, run_suffix, split_inputs_unsupported,
                                                  split_reader_inputs)
from wordpos.probing.errors import ConfigError
from wordpos.probing.progress import progress_bar

log = logging.getLogger(__name__)

Ablation = Literal["counterfactual", "mean", "resample"]
ABLATIONS: tuple[str, ...] = ("counterfactual", "mean", "resample")


# how closely a shortcut route (the lean forward, the suffix run on cached prefix keys/values) must reproduce a plain
# run's probe residual, per dtype, as the largest error at any position relative to that position's norm
ROUTE_TOLERANCE = {torch.float64: 1e-7, torch.float32: 1e-3}
LOW_PRECISION_TOLERANCE = 0.1


def position_error(out: Float[Tensor, "... pos d_model"], ref: Float[Tensor, "... pos d_model"]) -> float:
    """The largest error at any position relative to that position's residual norm: a model's few huge activations
    must not set the bar for the rest (in bfloat16 a bound relative to the largest value let a RoPE off by 3
    positions through)."""
    ref = ref.double()
    return float(((out.double() - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-12)).max())


def route_tolerance(dtype: torch.dtype) -> float:
    return ROUTE_TOLERANCE.get(dtype, LOW_PRECISION_TOLERANCE)


def route_mismatch(out: Tensor, ref: Tensor, differs: str, instead: str) -> str | None:
    """Why a shortcut route's probe residual ``out`` may not stand in for a plain run's ``ref`` (``differs``: what
    differs from what), logged with what is done ``instead``; None when it agrees within :func:`route_tolerance`."""
    err, tol = position_error(out, ref), route_tolerance(ref.dtype)
    if err <= tol:
        return None
    msg = f"{differs} by {err:.2e} of a position's norm (> {tol:.0e})"
    log.warning("edge runner: %s; %s", msg, instead)
    return msg


def tokens_per_forward(engine: Engine, n_writers: int, *, max_tokens: int | None = None, grad: bool = False) -> int:
    """Token rows (circuits × pairs × positions) per patched forward: 4096 on CPU (cache-sized batches run fastest
    there), 2^18 on an accelerator, and never more than fit a 1 GiB (CPU) / 8 GiB writer-difference buffer.
    Gradient passes keep the activations for the backward, so they take a quarter."""
    cpu = engine.device.type == "cpu"
    base = max_tokens or Sizing().tokens_per_forward(engine.device)  # the runner's one chunking rule
    mem = (1 << 30 if cpu else 8 << 30) // max(1, 4 * n_writers * engine.dims.d_model)
    n = min(base, mem)
    if grad and max_tokens is None:
        n //= 4
    return max(1, int(n))



@dataclass
class EdgeEval:
    """Per-pair normalised probe metric (1 = clean) of each circuit, the full model and the empty circuit.
    ``values.mean(1)`` equals the context's metric over all pairs (pairs weighted by their number of targets)."""

    values: Float[Tensor, "n_circuits n_pairs"]
    full: Float[Tensor, " n_pairs"]
    empty: Float[Tensor, " n_pairs"]
    ablation: str
    n_edges: Int[Tensor, " n_circuits"] = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    def __post_init__(self) -> None:
        if self.ablation not in ABLATIONS:
            raise ConfigError(f"ablation must be one of {ABLATIONS}, got {self.ablation!r}.")
        if self.values.dim() != 2 or self.values.shape[1] != self.full.shape[0] or self.empty.shape != self.full.shape:
            raise ConfigError(f"values {tuple(self.values.shape)}, full {tuple(self.full.shape)} and empty "
                              f"{tuple(self.empty.shape)} must be [n_circuits, n_pairs], [n_pairs], [n_pairs].")

    def faithfulness(self) -> Float[Tensor, " n_circuits"]:
        """f(C) = (m(C) − m(∅)) / (m(N) − m(∅)) over all pairs."""
        e, f = self.empty.mean(), self.full.mean()
        return (self.values.mean(1) - e) / (f - e)

    def to_dict(self) -> dict[str, Any]:
        return {"values": self.values.tolist(), "full": self.full.tolist(), "empty": self.empty.tolist(),
                "ablation": self.ablation, "n_edges": self.n_edges.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EdgeEval":
        t = lambda k: torch.tensor(d[k], dtype=torch.float64)  # noqa: E731
        return cls(t("values"), t("full"), t("empty"), d["ablation"], torch.tensor(d.get("n_edges", []), dtype=torch.long))


class EdgeRunner:
    """Edge-level interventions on one :class:`~wordpos.patching.activation.PatchContext`: the graph up to the probe,
    the writers' ablated outputs (computed once), and the patched forward."""

    #: one correction product per layer for its q, k and v readers (False: one per site; kept for benchmarks)
    fuse_qkv: bool = True

    def __init__(self, model: Any, ctx: Any, graph: EdgeGraph | None = None, *, ablation: Ablation = "counterfactual",
                 reference: Int[Tensor, "n_ref pos"] | None = None, seed: int = 0, max_tokens: int | None = None,
                 share_prefix: bool = True, lean: bool = True):
        if ablation not in ABLATIONS:
            raise ConfigError(f"ablation must be one of {ABLATIONS}, got {ablation!r}.")
        from wordpos.patching.activation import PatchContext, check_context_model

        if not isinstance(ctx, PatchContext):
            raise ConfigError(f"ctx must be a PatchContext from wordpos.patching.prepare(model, pairs, probe), got "
                              f"{type(ctx).__name__}.")
        check_context_model(model, ctx)
        self.engine = as_engine(model if model is not None else ctx.engine)
        reason = split_inputs_unsupported(self.engine)  # once per model: the bridge fires every reader's hook and
        if reason is not None:                          # the residual stream is the sum of the graph's writers
            raise ConfigError(f"{reason}. Use the head-level circuit instead (wordpos run --circuit heads).")
        self.ctx = ctx
        self.probe_layer = int(ctx.probe.layer)
        dims = self.engine.dims
        self.graph = graph if graph is not None else EdgeGraph.for_model(dims, self.probe_layer)
        g = self.graph
        if (g.n_layers, g.n_heads, g.n_kv_heads, g.probe_layer, g.parallel_attn_mlp) != (
                dims.n_layers, dims.n_heads, dims.n_kv_heads, self.probe_layer, dims.parallel_attn_mlp):
            old = "" if g.parallel_attn_mlp == dims.parallel_attn_mlp else (
                " (it gives this model's parallel attention/MLP blocks head -> same-layer MLP edges: scores and circuits "
                "saved by an earlier wordpos for it are wrong; score the edges again)" if dims.parallel_attn_mlp else
                " (it is the graph of a model with parallel attention/MLP blocks; this model's blocks are sequential)")
            raise ConfigError(f"the graph ({g.to_dict()}) is not this model's graph up to the probe's layer "
                              f"{self.probe_layer}{old}; build it with EdgeGraph.for_model(engine.dims, probe.layer).")
        self.ablation = ablation
        self.max_tokens = max_tokens
        self.pairs = ctx.pairs.to(self.engine.device)
        self.W_O = head_out_weights(self.engine, self.probe_layer + 1)
        self.dtype = self.W_O.dtype
        self._layout()
        self.ablated = self._ablated_outputs(reference, seed)  # [W, B | 1, T, d]
        self.clean_out: Tensor | None = None  # the clean run's writer outputs, filled by EAP when needed
        self._metrics: dict[tuple[int, int], Any] = {}
        self._valid: Tensor | None = None  # graph.valid on the device, in the runner's dtype
        self._full: Tensor | None = None  # the clean and the empty circuit's values: fixed for a runner
        self._empty: Tensor | None = None
        self.p0 = 0  # patched forwards run positions p0.. on top of the pairs' cached prefix (0: full prompts)
        self.prefix: PrefixKV | None = None
        self.prefix_reason = "share_prefix=False" if not share_prefix else None
        self.lean: LeanBlocks | None = None  # the hook-free forward, when this model allows it and it checks out
        self.x0: Tensor | None = None  # the clean prompts' layer-0 residual (the lean forward's input)
        self.lean_reason = "lean=False" if not lean else None
        # with the lean forward, its own check (a plain run's probe residual, on the prefix) covers the prefix too;
        # the bridge's suffix route is checked only if the lean forward is not taken
        pending = self._setup_prefix(reference, check=not (lean and lean_unsupported(self.engine) is None)) \
            if share_prefix else None
        if lean:
            self._setup_lean()
        if pending is not None and self.lean is None:
            self._finish_prefix(*pending)

    # ------------------------------------------------------------------ lean forward
    def _setup_lean(self) -> None:
        reason = lean_unsupported(self.engine)
        if reason is None:
            try:
                blocks = LeanBlocks(self.engine, self.probe_layer + 1)
                self.x0 = self._clean_input()
                reason = self._check_lean(blocks)
            except Exception as e:  # noqa: BLE001 - any failure of the lean route means: keep the bridge's hooks
                reason = f"the lean forward failed ({type(e).__name__}: {e})"
                log.warning("edge runner: %s; using the bridge's hooks", reason, exc_info=True)
        if reason is not None:
            self.lean_reason, self.x0 = reason, None
            log.info("edge runner: the bridge's hooks (no lean forward): %s", reason)
            return
        self.lean = blocks

    def _clean_input(self) -> Float[Tensor, "n_pairs pos d_model"]:
        """The residual entering layer 0 of the clean prompts: from the context's caches, else a forward."""
        name = H.resid(0, "resid_pre")
        x = self._run_cache("clean").get(name)
        if x is None or tuple(x.shape[:2]) != tuple(self.pairs.clean.shape):
            with torch.no_grad():
                _, cache = self.engine.run(self.pairs.clean, cache=[name], stop_at_layer=1)
            x = cache[name]
        return x.to(self.engine.device).detach()

    @torch.no_grad()
    def _check_lean(self, blocks: LeanBlocks) -> str | None:
        """The lean forward must reproduce a plain run's probe residual (two pairs; the context's base run when it
        holds its input and output, else a forward of the clean prompts)."""
        n, p0, P = min(2, len(self.pairs)), self.p0, self.probe_layer + 1
        base = self._context_base(p0)
        if base is not None and base["x"] is not None:
            x, full = base["x"][:n], base["out"][:n]
        else:
            x = self.x0[:n]
            full, _ = self.engine.run(self.pairs.clean[:n], stop_at_layer=P)
        dev = self.engine.device
        x, full = x.to(dev), full.to(dev)
        past = None
        if p0:
            pre = self._prefix_rows(torch.arange(n, device=dev), n)
            past = (pre.keys, pre.values)
        out = blocks.forward(x[:, p0:], start=p0, past=past)
        return route_mismatch(out, full[:, p0:], "the lean forward differs from a plain run", "using the bridge's hooks")

    # ------------------------------------------------------------------ shared prefix
    def shared_prefix_len(self, reference: Tensor | None = None) -> int:
        """The first position where a writer's ablated output can differ from its clean one: clean vs corrupted
        (counterfactual), and also across the pairs (resample) and the reference prompts (mean); never past the
        first target (the metric reads the suffix)."""
        clean = self.pairs.clean
        same = (clean == self.pairs.corrupted).all(0)
        if self.ablation in ("resample", "mean"):
            same &= (clean == clean[:1]).all(0)
            if self.ablation == "mean" and reference is not None:
                same &= (reference.to(clean.device) == clean[:1]).all(0)
        p0 = int(same.long().cumprod(0).sum())
        first_target = int(self.pairs.target_pos[self.pairs.target_mask].min())
        return min(p0, first_target, clean.shape[1] - 1)

    def _setup_prefix(self, reference: Tensor | None, check: bool = True) -> tuple | None:
        """Take the shared prefix (the context's cached base run, else a run of the prefix), checked against a
        plain run now, or (``check=False``) returned for :meth:`_finish_prefix` to check later."""
        reason = prefix_kv_unsupported(self.engine)
        p0 = self.shared_prefix_len(reference)
        if reason is None and p0 < 1:
            reason = "the prompts differ from the first position on"
        if reason is None:
            try:
                ctx_prefix = self._context_prefix(p0)
                if ctx_prefix is not None:  # prepare's base run: its first p0 positions are every prompt's
                    prefix, tokens, full = ctx_prefix
                else:
                    prefix = run_prefix(self.engine, self.pairs.clean[:, :p0], self.probe_layer + 1)
                    tokens, full = self.pairs.clean, None
                if check:
                    reason = self._check_prefix(prefix, p0, tokens, full)
            except Exception as e:  # noqa: BLE001 - any failure of the cached route means: run full prompts
                reason = f"the cached-prefix run failed ({type(e).__name__}: {e})"
        if reason is not None:
            self.prefix_reason = reason
            log.info("edge runner: full prompts (no shared prefix): %s", reason)
            return None
        # the metric reads only the suffix: every target is at or after p0 (shared_prefix_len stops at the first)
        assert int(self.pairs.target_pos[self.pairs.target_mask].min()) >= p0
        self.p0, self.prefix = p0, prefix
        return None if check else (prefix, p0, tokens, full)

    def _finish_prefix(self, prefix: PrefixKV, p0: int, tokens: Tensor, full: Tensor | None) -> None:
        """The deferred check of the bridge's suffix route (the lean forward was not taken)."""
        try:
            reason = self._check_prefix(prefix, p0, tokens, full)
        except Exception as e:  # noqa: BLE001
            reason = f"the cached-prefix run failed ({type(e).__name__}: {e})"
        if reason is not None:
            self.p0, self.prefix, self.prefix_reason = 0, None, reason
            log.info("edge runner: full prompts (no shared prefix): %s", reason)

    def _context_base(self, p0: int) -> dict[str, Any] | None:
        """The context's base run (``prepare``'s: its prompts, the residual entering layer 0, the probe residual and
        the keys/values) when it was made on this model in this dtype, for prompts of the pairs' shape that share
        their first ``p0`` tokens; else None. The lean check and the cached prefix both read it."""
        if not self._same_model():
            return None
        base, out = getattr(self.ctx, "base", None), getattr(self.ctx, "base_out", None)
        shape = tuple(self.pairs.clean.shape)
        if base is None or out is None or tuple(base.shape) != shape or tuple(out.shape[:2]) != shape \
                or out.dtype != self.dtype:
            return None
        dev = self.engine.device
        if not bool((base[:, :p0].to(dev) == self.pairs.clean[:, :p0]).all()):  # a context of other prompts
            return None
        x = (getattr(self.ctx, "base_cache", None) or {}).get(H.resid(0, "resid_pre"))
        if x is not None and (tuple(x.shape[:2]) != shape or x.dtype != self.dtype):
            x = None
        return {"tokens": base, "x": x, "out": out, "kv": getattr(self.ctx, "base_kv", None)}

    def _context_prefix(self, p0: int) -> tuple[PrefixKV, Tensor, Tensor] | None:
        """The context's cached base run (``prepare``'s keys/values at every position) cut to its first ``p0``
        positions, which every prompt shares, with the base prompts and their probe residual to check it against;
        None when the context has none that fits."""
        base = self._context_base(p0)
        kv, P = (base or {}).get("kv"), self.probe_layer + 1
        if kv is None or kv.resid is None or len(kv.keys) < P or kv.rows != len(self.pairs) or kv.length < p0:
            return None
        dev = self.engine.device
        cut = lambda t: t[:, :, :p0].to(dev).contiguous()  # noqa: E731 - [rows, kv_heads, pos, d_head]
        prefix = PrefixKV([cut(k) for k in kv.keys[:P]], [cut(v) for v in kv.values[:P]],
                          kv.resid[:, :p0].to(dev).contiguous())
        return prefix, base["tokens"].to(dev), base["out"].to(dev)

    @torch.no_grad()
    def _check_prefix(self, prefix: PrefixKV, p0: int, tokens: Tensor, full: Tensor | None = None) -> str | None:
        """The suffix run on the cached prefix must reproduce the full prompt's probe residual (two pairs of
        ``tokens``; ``full``: their probe residual when already known)."""
        n = min(2, len(self.pairs))
        if full is None:
            full, _ = self.engine.run(tokens[:n], stop_at_layer=self.probe_layer + 1)
        full = full[:n]
        sub = PrefixKV([k[:n] for k in prefix.keys], [v[:n] for v in prefix.values], prefix.resid[:n])
        with split_reader_inputs(self.engine):
            suf = run_suffix(self.engine, tokens[:n, p0:], sub, 1, (), self.probe_layer + 1)
        return route_mismatch(suf, full[:, p0:], "the cached-prefix run differs from the full prompt",
                              "running full prompts")

    # ------------------------------------------------------------------ layout
    def _layout(self) -> None:
        g = self.graph

        def span(idx: Sequence[int]) -> slice:
            idx = list(idx)
            if idx != list(range(idx[0], idx[0] + len(idx))):
                raise AssertionError("graph nodes of one group must be contiguous")
            return slice(idx[0], idx[-1] + 1)

        self.w_heads, self.w_mlp, self.r_sites = [], [], []
        self._qkv_span: dict[int, slice] = {}  # first reader of a q, k or v group -> its layer's q/k/v readers
        for L in range(self.probe_layer + 1):
            heads, mlp = g.writers_of(L)
            self.w_heads.append(span(heads))
            self.w_mlp.append(mlp)
            sites = {}
            for site in ("q", "k", "v"):
                sites[site] = (span(g.readers_of(L, site)), heads[0])  # readers, writers before them
            # parallel blocks: the MLP reads the layer's input, before its heads write
            sites["mlp"] = (span(g.readers_of(L, "mlp")), heads[0] if g.parallel_attn_mlp else mlp)
            self.r_sites.append(sites)
            q, k, v = (sites[site][0] for site in ("q", "k", "v"))
            if not (k.start == q.stop and v.start == k.stop):
                raise AssertionError("a layer's q, k and v readers must be contiguous")
            qkv = slice(q.start, v.stop)
            self._qkv_span.update({sites[site][0].start: qkv for site in ("q", "k", "v")})
        self.r_probe = g.n_readers - 1

    def writer_names(self) -> list[str]:
        names = [H.resid(0, "resid_pre")]
        for L in range(self.probe_layer + 1):
            names += [H.attn_z(L), H.mlp_out(L)]
        return names

    @torch.no_grad()
    def writer_outputs(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "n_writers batch pos d_model"]:
        """Every writer's output on ``tokens`` (a plain forward, chunked)."""
        B, T = tokens.shape
        per = max(1, tokens_per_forward(self.engine, self.graph.n_writers, max_tokens=self.max_tokens) // T)
        out = torch.empty(self.graph.n_writers, B, T, self.engine.dims.d_model, dtype=self.dtype, device=self.engine.device)
        for s in range(0, B, per):
            sl = slice(s, min(B, s + per))
            _, cache = self.engine.run(tokens[sl], cache=self.writer_names(), stop_at_layer=self.probe_layer + 1)
            self._fill_outputs(out, cache, sl)
        return out

    def _fill_outputs(self, out: Tensor, cache: dict[str, Tensor], sl: slice) -> None:
        """Rows ``sl`` of the writer outputs from a cache of :meth:`writer_names`."""
        dev = self.engine.device
        out[0, sl] = cache[H.resid(0, "resid_pre")].to(dev, self.dtype)
        for L in range(self.probe_layer + 1):
            z = cache[H.attn_z(L)].to(dev, self.dtype)
            out[self.w_heads[L], sl] = einops.rearrange(torch.einsum("btha,had->bthd", z, self.W_O[L]),
                                                        "b t h d -> h b t d")
            out[self.w_mlp[L], sl] = cache[H.mlp_out(L)].to(dev, self.dtype)

    def _same_model(self) -> bool:
        """Whether the context was prepared on the runner's own model (so its caches are this model's)."""
        ctx_model = getattr(getattr(self.ctx, "engine", None), "model", None)
        return ctx_model is not None and ctx_model is getattr(self.engine, "model", None)

    def _run_cache(self, which: Literal["clean", "corrupted"]) -> dict[str, Tensor]:
        """The context's cache of the clean or corrupted run (``prepare``'s source or base run); empty if none, or if
        the context was prepared on another model or dtype than the runner's."""
        if not self._same_model():
            return {}
        source = "clean" if getattr(self.ctx, "direction", "denoising") == "denoising" else "corrupted"
        cache = getattr(self.ctx, "source_cache" if which == source else "base_cache", None) or {}
        name = H.resid(0, "resid_pre")
        if name in cache and cache[name].dtype != self.dtype:
            return {}
        return cache

    def run_outputs(self, which: Literal["clean", "corrupted"]) -> Float[Tensor, "n_writers n_pairs pos d_model"]:
        """Every writer's output in the pairs' clean or corrupted run: from the context's caches when
        :func:`~wordpos.patching.activation.prepare` kept that run's writer sites (its source run always; its base
        run with ``full_base_cache=True``), else a forward over the prompts."""
        tokens, cache = getattr(self.pairs, which), self._run_cache(which)
        names = self.writer_names()
        if all(n in cache and tuple(cache[n].shape[:2]) == tuple(tokens.shape) for n in names):
            B, T = tokens.shape
            out = torch.empty(self.graph.n_writers, B, T, self.engine.dims.d_model, dtype=self.dtype,
                              device=self.engine.device)
            self._fill_outputs(out, cache, slice(None))
            return out
        return self.writer_outputs(tokens)

    def _ablated_outputs(self, reference: Tensor | None, seed: int) -> Tensor:
        if self.ablation == "counterfactual":
            if reference is not None:
                raise ConfigError("counterfactual ablation uses the corrupted prompts; pass reference= only with "
                                  "ablation='mean'.")
            return self.run_outputs("corrupted")
        if self.ablation == "resample":
            clean = self.run_outputs("clean")
            return clean[:, derangement(len(self.pairs), seed).to(clean.device)]
        if reference is None:  # the clean and corrupted prompts
            clean = self.run_outputs("clean")
            corrupted = self.run_outputs("corrupted")
            return (clean.sum(1, keepdim=True) + corrupted.sum(1, keepdim=True)) / (2 * clean.shape[1])
        ref = reference.to(self.engine.device)
        if ref.dim() != 2 or ref.shape[1] != self.pairs.clean.shape[1]:
            raise ConfigError(f"the mean-ablation reference must be token ids [n, {self.pairs.clean.shape[1]}] (the "
                              f"pairs' length, so positions line up), got {tuple(ref.shape)}.")
        return self.writer_outputs(ref).mean(1, keepdim=True)

    # ------------------------------------------------------------------ metric per pair
    def pair_values(self, resid: Float[Tensor, "rows pos d_model"], idx: slice) -> Float[Tensor, "copies batch"]:
        """Normalised metric per pair for stacked copies of pairs ``idx``; scaled so the mean over all pairs
        equals the context's metric."""
        from wordpos.patching.metrics import ProbeMetric

        m = self.ctx.metric
        if isinstance(idx, slice):  # one metric per slice of pairs: building one reads the labels back (a sync)
            key = (idx.start, idx.stop)
            if key not in self._metrics:
                self._metrics[key] = ProbeMetric(m.probe, self.pairs.subset(idx), kind=m.kind)
            metric = self._metrics[key]
        else:
            metric = ProbeMetric(m.probe, self.pairs.subset(idx), kind=m.kind)
        sub = metric.pairs
        per = metric.per_target(resid)  # [copies, b, k]
        mask = sub.target_mask.to(per.dtype)
        per_pair = self.pairs.target_mask.sum().to(per.dtype) / len(self.pairs)
        raw = (per * mask).sum(-1) / per_pair
        return m.normalize(raw)

    # ------------------------------------------------------------------ the patched forward
    def forward(self, tokens: Int[Tensor, "batch pos"], ablated: Float[Tensor, "n_writers batch_or_1 pos d_model"],
                keep_not: Float[Tensor, "n_circuits n_writers n_readers"] | None, *,
                record: dict[int, Tensor] | None = None, input_fn: Callable[[Tensor], Tensor] | None = None,
                pairs: slice | Tensor | None = None) -> Float[Tensor, "rows pos d_model"]:
        """The probe's residual for ``C = keep_not.shape[0]`` circuits × the batch (rows ``(c b)``), where
        ``keep_not[c, w, r] = 1`` ablates edge (w, r) in circuit c. ``record`` (a dict) receives each reader group's
        input keyed by its first reader index (for gradients); ``input_fn`` replaces the layer-0 residual.

        With a shared prefix (``self.p0 > 0``) only positions ``p0..`` run: the hooks, ``record`` and
        ``input_fn`` see those positions; the returned residual has the prefix's (unpatched) rows put back.
        ``pairs`` (a slice or index tensor) names the pair of each row of ``tokens`` (default: all pairs, in order).
        Runs on :class:`~wordpos.probing.engines.lean.LeanBlocks` when the runner set it up (``self.lean``), else
        through the bridge's split-input hooks."""
        eng, P, p0 = self.engine, self.probe_layer, self.p0
        if p0:
            tokens, ablated = tokens[:, p0:], ablated[:, :, p0:]
        b, T = tokens.shape
        d = eng.dims.d_model
        C = 1 if keep_not is None else keep_not.shape[0]
        D = None
        if keep_not is not None:
            keep_not = keep_not.to(self.dtype)
            # which readers have an ablated edge from a writer before them in some circuit: one host copy per
            # forward, not a sync per reader
            if self._valid is None:
                self._valid = self.graph.valid.to(eng.device, self.dtype)
            ablated_any = (keep_not * self._valid).amax((0, 1)).bool().tolist()
            # every writer's slot is written (put) before a reader after it reads it: no fill needed
            D = torch.empty(C, self.graph.n_writers, b * T * d, dtype=self.dtype, device=eng.device)
            abl = ablated.expand(-1, b, -1, -1)  # [W, b, t, d] (a view)
            kT = keep_not.transpose(1, 2).contiguous()  # [C, R, W]: contiguous rows, so bmm copies nothing

        fused: dict[tuple[int, int], Tensor] = {}  # one layer's q/k/v correction product (see correction)

        def put(w: slice, out: Tensor) -> None:  # out: [(c b), t, k, d]; D[c, w] = out - ablated, in one kernel
            if D is not None:
                fused.clear()  # D changes: a product of it is stale (and its memory is free before the MLP)
                o = out.to(self.dtype).view(C, b, *out.shape[1:]).permute(0, 3, 1, 2, 4)  # [C, k, b, t, d] (a view)
                torch.sub(o, abl[w], out=D[:, w].view(C, -1, b, T, d))

        def product(span: slice, w_end: int) -> Tensor:
            """``Σ_w kT[c, span, w] · D[c, w]`` over the writers before ``w_end``: [C, R, (b t d)], kept until D
            changes, so the readers of one span (a layer's q, k and v) share one product."""
            key = (span.start, w_end)
            if key not in fused:
                fused.clear()
                fused[key] = torch.bmm(kT[:, span, :w_end], D[:, :w_end])
            return fused[key]

        def correction(r: slice, w_end: int) -> Tensor | None:
            """Σ over ablated edges into readers r of (out_w − ablated_w), as a view [C, b, t, R, d]. A layer's
            q, k and v readers share their writers, so one bmm serves all three: the product reads the writers'
            differences D once per layer instead of once per site (it is bound by reading D)."""
            if D is None or not any(ablated_any[r]):
                return None
            span = self._qkv_span.get(r.start, r) if self.fuse_qkv else r
            corr = product(span, w_end)[:, r.start - span.start:r.stop - span.start]
            return corr.view(C, -1, b, T, d).permute(0, 2, 3, 1, 4)

        def ablate(act: Tensor, r: slice, w_end: int, out: Tensor | None = None) -> Tensor | None:
            """``act`` ([(c b), t, R, d], or [(c b), t, d] for one reader) less its readers' corrections, written
            into ``out`` when given; None when no circuit ablates an edge into them."""
            corr = correction(r, w_end)
            if corr is None:
                return None
            a = act.view(C, b, *act.shape[1:])  # (unflatten's Python wrapper costs more than the view)
            o = torch.empty(a.shape, dtype=a.dtype, device=a.device) if out is None else out.view(a.shape)
            torch.sub(a, (corr[:, :, :, 0] if a.dim() == 4 else corr).to(a.dtype), out=o)
            return o.flatten(0, 1) if out is None else out  # (row-major: the flatten is a view)

        def ablate_qkv(resid: Tensor, L: int, out: Tensor) -> Tensor | None:
            """All of layer ``L``'s q, k and v inputs at once, written into the lean blocks' slot-major buffer
            ``out`` ([slots, (c b), t, d], slots in reader order: one subtraction for the three sites) when some
            circuit ablates an edge into each of the three sites; else None (site by site: a site whose input is the
            residual stream keeps the model's own projection, and its roundings)."""
            sites = self.r_sites[L]
            if D is None or not self.fuse_qkv or not all(any(ablated_any[sites[x][0]]) for x in ("q", "k", "v")):
                return None
            r, w_end = sites["q"]
            corr = product(self._qkv_span[r.start], w_end).view(C, -1, b, T, d).transpose(0, 1)  # [R, C, b, t, d]
            torch.sub(resid.view(C, b, T, d), corr.to(resid.dtype), out=out.view(corr.shape))
            return out

        pre = self._prefix_rows(pairs, b) if p0 else None
        if self.lean is not None:
            out = self._lean_forward(tokens, b, C, pre, pairs, put, ablate, record, input_fn, D is not None,
                                     ablate_qkv)
        else:
            out = self._hooked_forward(tokens, C, pre, put, ablate, record, input_fn, D is not None)
        patched = ablate(out, slice(self.r_probe, self.r_probe + 1), self.graph.n_writers)
        if patched is not None:
            out = patched
        if record is not None:
            record[self.r_probe] = out
        if p0:
            head = einops.repeat(pre.resid, "b t d -> (c b) t d", c=C) if C > 1 else pre.resid
            out = torch.cat([head.to(out.dtype), out], 1)
        return out

    def _hooked_forward(self, tokens: Tensor, C: int, pre: PrefixKV | None, put: Callable, ablate: Callable,
                        record: dict[int, Tensor] | None, input_fn: Callable[[Tensor], Tensor] | None,
                        patched: bool) -> Tensor:
        """The patched forward through the bridge's split reader inputs and hooks."""
        eng, P = self.engine, self.probe_layer
        x = einops.repeat(tokens, "b t -> (c b) t", c=C) if C > 1 else tokens
        hooks: list[tuple[str, Callable]] = []
        if patched:
            hooks.append((H.resid(0, "resid_pre"), lambda act, _n: put(slice(0, 1), act[:, :, None])))
        if input_fn is not None:
            hooks.insert(0, (H.resid(0, "resid_pre"), lambda act, _n: input_fn(act)))
        for L in range(P + 1):
            for site in ("q", "k", "v", "mlp"):
                r, w_end = self.r_sites[L][site]

                def reader(act: Tensor, _n: str, r=r, w_end=w_end) -> Tensor:
                    patched = ablate(act, r, w_end)
                    if patched is not None:
                        act = patched
                    if record is not None:
                        # a new node: the hook's input may be the residual stream itself (hook_mlp_in), whose
                        # gradient would include the skip path; the clone's is this reader's alone
                        act = act.clone()
                        record[r.start] = act
                    return act

                hooks.append((reader_hook(L, site), reader))
            if patched:
                hooks.append((H.attn_z(L), lambda act, _n, L=L: put(
                    self.w_heads[L], torch.einsum("ntha,had->nthd", act.to(self.dtype), self.W_O[L]))))
                hooks.append((H.mlp_out(L), lambda act, _n, L=L: put(slice(self.w_mlp[L], self.w_mlp[L] + 1),
                                                                      act[:, :, None])))
        with split_reader_inputs(eng):
            if pre is not None:
                return run_suffix(eng, x, pre, C, hooks, P + 1)
            out, _ = eng.run(x, hooks=hooks, stop_at_layer=P + 1)
        return out

    def _lean_forward(self, tokens: Tensor, b: int, C: int, pre: PrefixKV | None, pairs: slice | Tensor | None,
                      put: Callable, ablate: Callable, record: dict[int, Tensor] | None,
                      input_fn: Callable[[Tensor], Tensor] | None, patched: bool, ablate_qkv: Callable) -> Tensor:
        """The patched forward on :class:`LeanBlocks`: the same readers and writers, no hooks (writers only when
        ``patched``: no per-head writes are computed when no circuit reads them). The layer-0 residual is the clean
        prompts' (the runner's ``x0``), rows ``(c b)``."""
        assert self.lean is not None and self.x0 is not None
        x0 = self.x0[pairs] if pairs is not None else self.x0
        if x0.shape[0] != b:
            raise ConfigError(f"a lean forward of {b} rows needs pairs= naming each row's pair "
                              f"({x0.shape[0]} rows given).")
        clean = self.pairs.clean[pairs] if pairs is not None else self.pairs.clean
        if tuple(tokens.shape) != tuple(clean[:, self.p0:].shape) or not torch.equal(tokens, clean[:, self.p0:]):
            raise ConfigError("the lean forward runs the pairs' clean prompts (its layer-0 input is their cached "
                              "residual); pass those tokens, or build the runner with lean=False to run others.")
        x = x0[:, self.p0:]
        x = einops.repeat(x, "b t d -> (c b) t d", c=C) if C > 1 else x
        if input_fn is not None:
            x = input_fn(x)
        if patched:
            put(slice(0, 1), x[:, :, None])
        sites = self.r_sites
        n_slots = {"q": self.lean.n_heads, "k": self.lean.n_kv_heads, "v": self.lean.n_kv_heads}

        def reader(L: int, site: str, resid: Tensor, out: Tensor | None = None) -> Tensor | None:
            if site == "qkv":  # the three sites at once into the blocks' slot-major buffer, or None: one by one
                return ablate_qkv(resid, L, out) if record is None else None
            r, w_end = sites[L][site]
            act = resid if site == "mlp" else resid[:, :, None].expand(-1, -1, n_slots[site], -1)
            patched = ablate(act, r, w_end, out if record is None else None)
            if record is not None:
                # a node of this reader's own (see _hooked_forward); the subtraction already made one
                act = act.clone() if patched is None else patched
                record[r.start] = act
                return act
            return patched  # None: this reader's input is the residual stream itself

        def writer(L: int, kind: str, out: Tensor) -> None:
            if kind == "heads":
                put(self.w_heads[L], out)
            else:
                put(slice(self.w_mlp[L], self.w_mlp[L] + 1), out[:, :, None])

        past = (pre.keys, pre.values) if pre is not None else None  # b rows: the lean blocks stack them C times
        return self.lean.forward(x, start=self.p0, past=past, reader=reader, writer=writer if patched else None)

    def _prefix_rows(self, pairs: slice | Tensor | None, b: int) -> PrefixKV:
        """The cached prefix of the pairs a forward runs (one row per row of its tokens)."""
        pre = self.prefix
        assert pre is not None
        if isinstance(pairs, slice) and pairs == slice(0, pre.keys[0].shape[0]):
            pairs = None
        if pairs is not None:
            pre = PrefixKV([k[pairs] for k in pre.keys], [v[pairs] for v in pre.values], pre.resid[pairs])
        if pre.keys[0].shape[0] != b:
            raise ConfigError(f"a shared-prefix forward of {b} rows needs pairs= naming each row's pair "
                              f"(the prefix holds {pre.keys[0].shape[0]} rows).")
        return pre

    # ------------------------------------------------------------------ evaluation
    def keep_not(self, masks: Bool[Tensor, "n_circuits n_writers n_readers"]) -> Tensor:
        masks = self.graph.check_mask(masks).to(self.engine.device)
        return (~masks & self.graph.valid.to(masks.device)).to(self.dtype)

    @torch.no_grad()
    def evaluate_keep_not(self, keep_not: Tensor | Callable[[int, int], Tensor], n_circuits: int | None = None,
                          *, progress: bool = False, desc: str = "edge circuits") -> Float[Tensor, "n_circuits n_pairs"]:
        """Per-pair values of circuits given as ablation matrices ``[C, W, R]`` (or a function ``(start, stop) ->``
        the matrices of circuits start..stop, so large sweeps never hold every mask at once)."""
        get = keep_not if callable(keep_not) else (lambda s, e: keep_not[s:e])
        C = n_circuits if n_circuits is not None else keep_not.shape[0]  # type: ignore[union-attr]
        B, T = self.pairs.clean.shape
        T -= self.p0  # positions each patched forward runs
        budget = tokens_per_forward(self.engine, self.graph.n_writers, max_tokens=self.max_tokens)
        pb = min(B, max(1, budget // T))
        cp = max(1, budget // (pb * T))
        # on the device until every forward is queued (a copy per forward would make each wait for the last)
        out = torch.empty(C, B, dtype=torch.float64, device=self.engine.device)
        bar = progress_bar(total=C * ((B + pb - 1) // pb), desc=desc, unit="circuit", disable=not progress)
        for c0 in range(0, C, cp):
            c1 = min(C, c0 + cp)
            kn = get(c0, c1).to(self.engine.device, self.dtype)
            for s0 in range(0, B, pb):
                sl = slice(s0, min(B, s0 + pb))
                abl = self.ablated if self.ablated.shape[1] == 1 else self.ablated[:, sl]
                resid = self.forward(self.pairs.clean[sl], abl, kn, pairs=sl)
                out[c0:c1, sl] = self.pair_values(resid, sl).double()
                bar.update(c1 - c0)
        bar.close()
        return out.cpu()

    @torch.no_grad()
    def clean_values(self) -> Float[Tensor, " n_pairs"]:
        """Per-pair value of the full model (computed once per runner)."""
        if self._full is None:
            self._full = self._clean_values()
        return self._full.clone()

    def _clean_values(self) -> Float[Tensor, " n_pairs"]:
        B, T = self.pairs.clean.shape
        per = max(1, tokens_per_forward(self.engine, self.graph.n_writers, max_tokens=self.max_tokens) // (T - self.p0))
        vals = torch.empty(B, dtype=torch.float64, device=self.engine.device)
        for s in range(0, B, per):
            sl = slice(s, min(B, s + per))
            if self.p0:  # the unpatched suffix on the cached prefix
                resid = self.forward(self.pairs.clean[sl], self.ablated[:, :1], None, pairs=sl)
            else:
                resid, _ = self.engine.run(self.pairs.clean[sl], stop_at_layer=self.probe_layer + 1)
            vals[sl] = self.pair_values(resid, sl)[0].double()
        return vals.cpu()

    def evaluate(self, masks: Bool[Tensor, "n_circuits n_writers n_readers"], *, progress: bool = False) -> EdgeEval:
        masks = self.graph.check_mask(masks)
        kn = self.keep_not(masks)
        # the empty circuit and the full model ride along with the first call's circuits (the full model as the
        # circuit that ablates nothing: every correction is exactly zero)
        new_empty, new_full = self._empty is None, self._full is None
        extra = [self.keep_not(self.graph.empty_mask())] if new_empty else []
        extra += [kn.new_zeros(1, *kn.shape[1:])] if new_full else []
        vals = self.evaluate_keep_not(torch.cat([kn, *extra]) if extra else kn, progress=progress)
        if new_full:
            vals, self._full = vals[:-1], vals[-1]
        if new_empty:
            vals, self._empty = vals[:-1], vals[-1]
        n_edges = (masks & self.graph.valid).sum((1, 2))
        return EdgeEval(vals, self.clean_values(), self._empty.clone(), self.ablation, n_edges)

    def exact_scores(self, edges: Sequence[str] | None = None, *, progress: bool = False) -> EdgeScores:
        """Exact edge patching: for each edge e, m(N with only e ablated) − m(N), averaged over pairs (the ground
        truth EAP approximates). ``edges`` limits it to some edges (the rest stay NaN)."""
        g = self.graph
        if edges is None:
            w_idx, r_idx = g.edge_index()
        else:
            ij = [g.edge(e) for e in edges]
            w_idx = torch.tensor([i for i, _ in ij], dtype=torch.long)
            r_idx = torch.tensor([j for _, j in ij], dtype=torch.long)
        E = len(w_idx)

        def one_hot(s: int, e: int) -> Tensor:
            kn = torch.zeros(e - s, g.n_writers, g.n_readers, dtype=self.dtype)
            kn[torch.arange(e - s), w_idx[s:e], r_idx[s:e]] = 1
            return kn

        vals = self.evaluate_keep_not(one_hot, E, progress=progress, desc="exact edge patching")
        full = self.clean_values()
        scores = torch.full((g.n_writers, g.n_readers), float("nan"), dtype=torch.float64)
        scores[w_idx, r_idx] = vals.mean(1) - full.mean()
        return EdgeScores(g, scores, "exact", self.ctx.metric.name, len(self.pairs),
                          {"ablation": self.ablation, "n_scored": E})


def evaluate_masks(model: Any, ctx: Any, masks: Bool[Tensor, "n_circuits n_writers n_readers"], *,
                   ablation: Ablation = "counterfactual", graph: EdgeGraph | None = None,
                   reference: Int[Tensor, "n_ref pos"] | None = None, seed: int = 0, max_tokens: int | None = None,
                   progress: bool = False, share_prefix: bool = True) -> EdgeEval:
    """Per-pair normalised probe metric of each circuit (edges outside it ablated), plus the full model and the
    empty circuit under the same ablation. One patched forward per chunk of circuits × pairs."""
    runner = EdgeRunner(model, ctx, graph, ablation=ablation, reference=reference, seed=seed, max_tokens=max_tokens,
                        share_prefix=share_prefix)
    return runner.evaluate(masks, progress=progress)


def exact_edge_scores(model: Any, ctx: Any, *, edges: Sequence[str] | None = None, ablation: Ablation = "counterfactual",
                      graph: EdgeGraph | None = None, max_tokens: int | None = None, progress: bool = False,
                      share_prefix: bool = True) -> EdgeScores:
    """Exact edge patching of every edge (or ``edges``): see :meth:`EdgeRunner.exact_scores`."""
    runner = EdgeRunner(model, ctx, graph, ablation=ablation, max_tokens=max_tokens, share_prefix=share_prefix)
    return runner.exact_scores(edges, progress=progress)


__all__ = ["ABLATIONS", "Ablation", "EdgeEval", "EdgeRunner", "evaluate_masks", "exact_edge_scores", "tokens_per_forward"]
