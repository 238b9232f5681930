"""The built-in methods' stage functions: activation, attribution, path and ablation (the stages of ``wordpos
patch``), and the statistics the stages share (head means, head roles). :mod:`wordpos.patching.registry` lists
them by name and imports this module on a method's first run."""

from __future__ import annotations

import numpy as np

from wordpos.patching.ablation import ablate_heads, ablated_sets, head_means
from wordpos.patching.activation import patch_heads, patch_layer_outputs, patch_resid
from wordpos.patching.attribution import correlation
from wordpos.patching.path import path_patch_direct, path_patch_edges
from wordpos.patching.registry import PAIR_OPTIONS, StageInputs, StageOutput  # noqa: F401 - PAIR_OPTIONS, as before
from wordpos.patching.results import EffectResult
from wordpos.patching.roles import head_roles


def _label(inp: StageInputs, ctx) -> str:
    return f"{inp.config.model}, {ctx.direction}, {ctx.metric.name}, {len(ctx.pairs)} pairs"


def _heads_fig(inp: StageInputs, res: EffectResult, what: str, ctx) -> object:
    return res.figure(f"{what} of heads ({_label(inp, ctx)})")


def activation_stage(inp: StageInputs) -> StageOutput:
    """Heads (all positions), the residual stream by position, MLP outputs, and heads x positions for the
    ``sizing.by_pos_heads`` heads with the largest |change|."""
    c, ctx = inp.config, inp.ctx()
    kw = dict(max_tokens=c.max_tokens, progress=inp.progress)
    ckpt = inp.checkpoint_dir()
    extra = {}
    if c.screen == "attribution":
        heads, extra = screened_heads(inp, ctx, ckpt, **kw)
    else:
        heads = patch_heads(inp.engine, ctx, checkpoint_dir=ckpt, **kw)
    res = {"heads": heads,
           "resid": patch_resid(inp.engine, ctx, checkpoint_dir=ckpt, **kw),
           "mlp": patch_layer_outputs(inp.engine, ctx, site="mlp_out", **kw)}
    if c.by_pos:
        top = [(h["layer"], h["index"]) for h in res["heads"].top_heads(c.sizing.by_pos_heads)]
        res["heads_by_pos"] = patch_heads(inp.engine, ctx, by_pos=True, heads=top, checkpoint_dir=ckpt, **kw)
    tokens = inp.engine.tokenizer.convert_ids_to_tokens(ctx.base[0].tolist())
    figs = {"resid": lambda: res["resid"].figure(f"Residual-stream patching ({_label(inp, ctx)})", tokens),
            "heads": lambda: _heads_fig(inp, res["heads"], "Activation patching", ctx)}
    return StageOutput(res, figs, extra)


def _exact_heads(inp: StageInputs, ctx) -> EffectResult:
    """Activation patching of heads for a stage that compares with or ranks by it: every head, or the
    attribution-screened heads (the same, checkpointed sweep as the activation stage) when ``screen="attribution"``."""
    c = inp.config
    kw = dict(max_tokens=c.max_tokens, progress=inp.progress)
    if c.screen == "attribution":
        return screened_heads(inp, ctx, inp.checkpoint_dir(), **kw)[0]
    return patch_heads(inp.engine, ctx, checkpoint_dir=inp.checkpoint_dir(), **kw)


def screened_heads(inp: StageInputs, ctx, ckpt, **kw) -> tuple[EffectResult, dict]:
    """Attribution first, exact where it matters: attribution patching ranks every head (one forward and one
    backward), exact activation patching measures the ``sizing.candidates`` heads it ranks highest plus
    ``sizing.audit`` heads drawn at random from the rest; when attribution's Spearman rank correlation with the
    exact values over all measured heads is below ``screen_min_rho``, every head is patched exactly instead.
    Heads not measured stay NaN (the attribution estimate is kept as ``extra["attribution"]``)."""
    from scipy.stats import spearmanr

    c = inp.config
    att = inp.attribution(ctx.metric.kind, ctx.direction)
    est = att.head_effects()
    n_layers, n_heads = est.shape
    order = np.argsort(-np.abs(np.nan_to_num(est)), axis=None)
    ranked = [tuple(int(i) for i in np.unravel_index(f, est.shape)) for f in order]
    cand = ranked[:c.sizing.candidates]
    rest = ranked[c.sizing.candidates:]
    rng = np.random.default_rng(c.seed)
    audit = [rest[i] for i in sorted(rng.choice(len(rest), min(c.sizing.audit, len(rest)), replace=False))] if rest else []
    measured = cand + audit
    info = {"screen": "attribution", "candidates": [f"{L}.{h}" for L, h in cand],
            "audit": [f"{L}.{h}" for L, h in audit], "n_heads": n_layers * n_heads}
    if len(measured) >= n_layers * n_heads:  # small model: the screen would measure every head anyway
        exact = patch_heads(inp.engine, ctx, checkpoint_dir=ckpt, **kw)
        info.update(fallback=False, measured="all")
    else:
        exact = patch_heads(inp.engine, ctx, heads=measured, checkpoint_dir=ckpt, **kw)
    e = exact.head_effects()

    def rank_corr(hs: list) -> float:  # NaN when undefined (fewer than 3 heads, or constant values)
        if len(hs) < 3:
            return float("nan")
        idx = tuple(np.array(hs).T)
        if np.ptp(est[idx]) == 0 or np.ptp(e[idx]) == 0:
            return float("nan")
        return float(spearmanr(est[idx], e[idx]).statistic)

    rho, rho_audit = rank_corr(measured), rank_corr(audit)
    info.update(rank_correlation=rho, audit_rank_correlation=rho_audit, min_rho=c.screen_min_rho)
    if len(measured) < n_layers * n_heads:
        info["fallback"] = not rho >= c.screen_min_rho
        if info["fallback"]:  # attribution does not rank these heads well enough: measure every head
            exact = patch_heads(inp.engine, ctx, checkpoint_dir=ckpt, **kw)
        info["measured"] = "all" if info["fallback"] else len(measured)
    exact.extra["attribution"] = est
    exact.config["screen"] = info
    return exact, {"screen": info}


def attribution_stage(inp: StageInputs) -> StageOutput:
    """Attribution patching of heads, with activation patching of heads to compare (their correlation)."""
    c, ctx = inp.config, inp.ctx()
    att = inp.attribution()
    act = _exact_heads(inp, ctx)
    return StageOutput({"heads": att, "activation_heads": act},
                       {"heads": lambda: _heads_fig(inp, att, "Attribution patching", ctx)},
                       {"correlation_with_activation": correlation(att, act)})


def path_stage(inp: StageInputs) -> StageOutput:
    """Direct paths of every head; sender → receiver edges among the heads activation patching ranks highest."""
    c, ctx = inp.config, inp.ctx()
    kw = dict(max_tokens=c.max_tokens, progress=inp.progress)
    direct = path_patch_direct(inp.engine, ctx, **kw)
    act = _exact_heads(inp, ctx)
    res = {"heads": direct, "activation_heads": act}
    ranked = [(h["layer"], h["index"]) for h in act.top_heads(c.receivers)]
    receivers = [(L, h) for L, h in ranked if L > 0] or None
    senders = [(h["layer"], h["index"]) for h in act.top_heads(c.senders)]
    senders = [s for s in senders if receivers and s[0] < max(L for L, _ in receivers)]
    if receivers and senders:
        res["edges"] = path_patch_edges(inp.engine, ctx, receivers=receivers, senders=senders, **kw)
    return StageOutput(res, {"heads": lambda: _heads_fig(inp, direct, "Path patching (direct)", ctx)})


def ablation_stage(inp: StageInputs) -> StageOutput:
    """Each head ablated alone (the ``sizing.candidates`` heads attribution ranks highest on big models; the
    others NaN), as the change in probe accuracy; then the top-k heads (largest drops) together against random
    k-sets from the same layers."""
    c, engine, probe = inp.config, inp.engine, inp.probe
    layer = int(probe.layer)
    data = inp.data(c.n_prompts)
    n_heads = engine.dims.n_heads
    heads = [(L, h) for L in range(layer + 1) for h in range(n_heads)]
    candidates = None
    if c.sizing.candidates < len(heads):  # big models: ablate the heads attribution patching ranks highest
        att = inp.attribution(metric="logit_diff", direction="denoising")
        candidates = [(h["layer"], h["index"]) for h in att.top_heads(c.sizing.candidates)]
        heads = candidates
    length = max(data.test.max_len(), data.train.max_len())
    means = head_means(engine, data.train, list(range(layer + 1)), length=length, sizing=c.run_sizing()) \
        if c.ablation == "mean" else None
    y = data.test.labels.numpy()
    memo: dict = {}  # the shared prefix's keys/values, run once for the stage's calls
    preds = ablated_sets(engine, layer, data.test, [[], *[[hd] for hd in heads]], c.ablation, means, seed=c.seed,
                         probe=probe, sizing=c.run_sizing(), progress=inp.progress,
                         desc=f"{c.ablation}-ablating heads", memo=memo).numpy()
    clean = float(np.mean(preds[0] == y))
    acc = np.full((layer + 1, n_heads), np.nan)  # NaN: not measured
    for (L, h), p in zip(heads, preds[1:]):
        acc[L, h] = np.mean(p == y)
    res = EffectResult(acc - clean, ("layer", "head"), "ablation", f"probe_accuracy ({c.ablation} ablation)",
                       direction="ablation", n_prompts=len(data.test),
                       config={"clean_accuracy": clean, "unpatched": clean, "ablation": c.ablation,
                               "candidates": None if candidates is None else [f"{L}.{h}" for L, h in candidates]},
                       extra={"level": acc})
    top = [(h["layer"], h["index"]) for h in res.top_heads(c.top_k, order="decrease")]
    ab = ablate_heads(engine, probe, data, top, method=c.ablation, n_random=c.n_random, seed=c.seed, sizing=c.run_sizing(),
                      progress=inp.progress, means=means, memo=memo)
    title = (f"{c.model}: change in probe accuracy when each head is {c.ablation}-ablated (layer {layer} probe; "
             "blank = not measured)")
    return StageOutput({"heads": res}, {"heads": lambda: res.figure(title)},
                       {"top_k_ablation": ab.to_dict()}, rank="decrease")


def head_means_stage(inp: StageInputs) -> StageOutput:
    """Position-wise mean head outputs of every layer up to the probe's (the mean-ablation reference)."""
    data = inp.data(inp.config.n_prompts)
    means = head_means(inp.engine, data.train, list(range(int(inp.probe.layer) + 1)), sizing=inp.config.run_sizing())
    return StageOutput({"means": means})


def roles_stage(inp: StageInputs) -> StageOutput:
    """Attention roles of every head up to the probe's layer, on held-out-word prompts."""
    s = inp.config.run_sizing()
    roles = head_roles(inp.engine, inp.data(s.role_prompts).test, layers=list(range(int(inp.probe.layer) + 1)),
                       sizing=s)
    return StageOutput({"roles": roles})

