"""The edge runner against hand-built references: plain TransformerLens hooks on the bridge, written here without
the runner's code (per-pair probe metric by a plain loop, writer outputs by hand einsums)."""

from __future__ import annotations

import pytest
import torch

from wordpos.patching.edge_graph import EdgeGraph
from wordpos.patching.edge_runner import EdgeRunner, derangement, evaluate_masks
from wordpos.probing.errors import ConfigError

TOL = 1e-5


# ---------------------------------------------------------------------------- independent references
def ref_pair_values(ctx, resid: torch.Tensor) -> torch.Tensor:
    """Per-pair normalised probe logit difference, by a plain loop over pairs and targets."""
    p = ctx.pairs
    probe = ctx.metric.probe
    span = ctx.metric.clean_value - ctx.metric.corrupted_value
    per_pair_targets = float(p.target_mask.sum()) / len(p)
    out = []
    for i in range(len(p)):
        tot = 0.0
        for k in range(p.target_pos.shape[1]):
            if not p.target_mask[i, k]:
                continue
            lg = probe.logits(resid[i, int(p.target_pos[i, k])][None])[0]
            tot += float(lg[int(p.clean_labels[i, k])] - lg[int(p.corrupted_labels[i, k])])
        out.append((tot / per_pair_targets - ctx.metric.corrupted_value) / span)
    return torch.tensor(out, dtype=torch.float64)


def plain_run(model, tokens, layer, hooks=(), split=False):
    """resid_post of ``layer`` with ordinary TransformerLens hooks (split q/k/v and MLP inputs if asked)."""
    store = {}

    def grab(act, hook):
        store["out"] = act

    if split:
        model.set_use_split_qkv_input(True)
        model.set_use_hook_mlp_in(True)
    try:
        with torch.no_grad():
            model.run_with_hooks(tokens, fwd_hooks=list(hooks) + [(f"blocks.{layer}.hook_resid_post", grab)])
    finally:
        if split:
            model.set_use_split_qkv_input(False)
            model.set_use_hook_mlp_in(False)
    return store["out"]


def head_out(model, tokens, layer, head):
    """z_head @ W_O[head] of ``layer`` on ``tokens``, by hand."""
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n == f"blocks.{layer}.attn.hook_z")
    z = cache[f"blocks.{layer}.attn.hook_z"][:, :, head]
    return (z @ model.blocks[layer].attn.W_O[head]).detach()


def embed_out(model, tokens):
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n == "blocks.0.hook_resid_pre")
    return cache["blocks.0.hook_resid_pre"].detach()


def mlp_out(model, tokens, layer):
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n == f"blocks.{layer}.hook_mlp_out")
    return cache[f"blocks.{layer}.hook_mlp_out"].detach()


def subtract_at(hook_name, slot, delta):
    def hook(act, hook):
        act = act.clone()
        if slot is None:
            act = act - delta
        else:
            act[:, :, slot] = act[:, :, slot] - delta
        return act

    return (hook_name, hook)


# (the tiny GQA Llama and the float64 GPT-2: llama_ctx, gpt2_ctx in tests/patching/conftest.py)


# ---------------------------------------------------------------------------- tests
def _full_empty_check(model, ctx):
    g = EdgeGraph.for_model(ctx.engine.dims, int(ctx.probe.layer))
    ev = evaluate_masks(model, ctx, torch.stack([g.full_mask(), g.empty_mask()]))
    L = int(ctx.probe.layer)
    clean_ref = ref_pair_values(ctx, plain_run(model, ctx.pairs.clean, L))
    corr_ref = ref_pair_values(ctx, plain_run(model, ctx.pairs.corrupted, L))
    # float32 (the planted model, residuals ~1e3 where one float32 step is 6e-5): batch composition and summation
    # order alone move a pair's normalised value by ~2e-5
    tol = TOL if clean_ref.dtype == torch.float64 and next(model.parameters()).dtype == torch.float64 else 5e-5
    assert torch.allclose(ev.values[0], clean_ref, atol=tol)
    assert torch.allclose(ev.full, clean_ref, atol=tol)
    assert torch.allclose(ev.values[1], corr_ref, atol=tol)
    assert torch.allclose(ev.empty, corr_ref, atol=tol)
    # the means are the context's metric (float32 sums inside ProbeMetric: 1e-4 on a random model's small span)
    assert ev.values[0].mean().item() == pytest.approx(float(ctx.metric(plain_run(model, ctx.pairs.clean, L))), abs=1e-4)
    assert ev.values[1].mean().item() == pytest.approx(float(ctx.metric(plain_run(model, ctx.pairs.corrupted, L))),
                                                       abs=1e-4)
    assert torch.allclose(ev.faithfulness(), torch.tensor([1.0, 0.0], dtype=torch.float64), atol=1e-4)
    assert ev.n_edges.tolist() == [g.n_edges, 0]


def test_full_and_empty_masks_tiny_gpt2(gpt2_ctx):
    _full_empty_check(*gpt2_ctx)


def test_full_and_empty_masks_planted(planted_model, planted_ctx):
    _full_empty_check(planted_model, planted_ctx)


def test_full_and_empty_masks_tiny_llama_gqa(llama_ctx):
    model, ctx = llama_ctx
    g = EdgeGraph.for_model(ctx.engine.dims, 1)
    assert g.n_kv_heads == 2 and len([r for r in g.readers if r.endswith("<k>")]) == 2 * 2
    _full_empty_check(model, ctx)


@pytest.mark.parametrize("edge", ["a0.h1->a1.h3<v>", "input->a0.h2<q>", "a0.h0->m1", "m0->a1.h2<k>", "a1.h2->probe"])
def test_exact_edge_equals_two_run_reference_tiny_gpt2(gpt2_ctx, edge):
    model, ctx = gpt2_ctx
    clean, corr = ctx.pairs.clean, ctx.pairs.corrupted
    w, r = edge.split("->")
    if w == "input":
        delta = embed_out(model, clean) - embed_out(model, corr)
    elif w.startswith("m"):
        L = int(w[1:])
        delta = mlp_out(model, clean, L) - mlp_out(model, corr, L)
    else:
        L, h = int(w[1]), int(w.split(".h")[1])
        delta = head_out(model, clean, L, h) - head_out(model, corr, L, h)
    if r == "probe":
        resid = plain_run(model, clean, 1) - delta
    elif r.startswith("m"):
        resid = plain_run(model, clean, 1, [subtract_at(f"blocks.{r[1:]}.hook_mlp_in", None, delta)], split=True)
    else:
        L, h, x = int(r[1]), int(r.split(".h")[1].split("<")[0]), r[-2]
        resid = plain_run(model, clean, 1, [subtract_at(f"blocks.{L}.attn.hook_{x}_input", h, delta)], split=True)
    ref = ref_pair_values(ctx, resid).mean() - ref_pair_values(ctx, plain_run(model, clean, 1)).mean()
    got = EdgeRunner(model, ctx).exact_scores([edge])
    g = got.graph
    assert float(got.scores[g.edge(edge)]) == pytest.approx(float(ref), abs=TOL)
    assert int((~torch.isnan(got.scores)).sum()) == 1


def test_exact_gqa_kv_edge_equals_reference(llama_ctx):
    model, ctx = llama_ctx
    clean, corr = ctx.pairs.clean, ctx.pairs.corrupted
    delta = head_out(model, clean, 0, 3) - head_out(model, corr, 0, 3)
    resid = plain_run(model, clean, 1, [subtract_at("blocks.1.attn.hook_k_input", 1, delta)], split=True)
    ref = ref_pair_values(ctx, resid).mean() - ref_pair_values(ctx, plain_run(model, clean, 1)).mean()
    got = EdgeRunner(model, ctx).exact_scores(["a0.h3->a1.h1<k>"])
    assert float(got.scores[got.graph.edge("a0.h3->a1.h1<k>")]) == pytest.approx(float(ref), abs=TOL)


def test_chunking_and_folding_do_not_change_values(tiny_model, tiny_ctx):
    g = EdgeGraph.for_model(tiny_ctx.engine.dims, 1)
    torch.manual_seed(0)
    masks = (torch.rand(3, g.n_writers, g.n_readers) < 0.5) & g.valid
    big = evaluate_masks(tiny_model, tiny_ctx, masks)
    T = tiny_ctx.pairs.clean.shape[1]
    small = evaluate_masks(tiny_model, tiny_ctx, masks, max_tokens=2 * T)  # 2 pairs per forward, 1 circuit
    assert torch.allclose(big.values, small.values, atol=1e-6)
    # one circuit alone equals the same circuit among others
    one = evaluate_masks(tiny_model, tiny_ctx, masks[1])
    assert torch.allclose(one.values[0], big.values[1], atol=1e-6)


def test_resample_and_mean_empty_circuits(gpt2_ctx):
    tiny_model, ctx = gpt2_ctx
    g = EdgeGraph.for_model(ctx.engine.dims, 1)
    clean = ctx.pairs.clean
    # resample: the empty circuit reads another pair's clean run entirely
    ev = evaluate_masks(tiny_model, ctx, g.full_mask(), ablation="resample", seed=3)
    perm = derangement(len(clean), 3)
    assert (perm != torch.arange(len(clean))).all()
    ref = ref_pair_values(ctx, plain_run(tiny_model, clean[perm], 1))
    assert torch.allclose(ev.empty, ref, atol=TOL)
    assert torch.allclose(ev.values[0], ev.full, atol=TOL)
    # mean: the empty circuit reads the reference set's mean residual stream (a sum of writers + biases)
    ref_tokens = torch.cat([clean, ctx.pairs.corrupted])
    mean_resid = plain_run(tiny_model, ref_tokens, 1).mean(0, keepdim=True).expand(len(clean), -1, -1)
    ev = evaluate_masks(tiny_model, ctx, g.full_mask(), ablation="mean")
    assert torch.allclose(ev.empty, ref_pair_values(ctx, mean_resid), atol=TOL)
    with pytest.raises(ConfigError):
        evaluate_masks(tiny_model, ctx, g.full_mask(), ablation="zero")
    with pytest.raises(ConfigError):
        evaluate_masks(tiny_model, ctx, torch.ones(3, 4, dtype=torch.bool))


@pytest.mark.parametrize("lean", [True, False])
def test_fused_qkv_correction_equals_one_product_per_site(llama_ctx, monkeypatch, lean):
    """One correction product per layer for its q, k and v readers (the default) gives each reader what a product
    of its own gives, on both forward routes: random circuits, and one that ablates only a layer's k readers (the
    fused product then serves k alone, its q rows unused)."""
    model, ctx = llama_ctx
    runner = EdgeRunner(model, ctx, lean=lean)
    assert (runner.lean is not None) == lean
    g = runner.graph
    gen = torch.Generator().manual_seed(0)
    masks = [(torch.rand(g.n_writers, g.n_readers, generator=gen) < p) & g.valid for p in (0.1, 0.5, 0.9)]
    k_only = g.full_mask().clone()
    k_only[:, runner.r_sites[1]["k"][0]] = False
    masks = torch.stack(masks + [k_only & g.valid])
    fused = runner.evaluate(masks).values
    monkeypatch.setattr(EdgeRunner, "fuse_qkv", False)
    per_site = EdgeRunner(model, ctx, lean=lean).evaluate(masks).values
    assert torch.allclose(fused, per_site, atol=1e-9, rtol=0)
    assert not torch.allclose(fused[3], EdgeRunner(model, ctx, lean=lean).evaluate(g.full_mask()[None]).values[0])
