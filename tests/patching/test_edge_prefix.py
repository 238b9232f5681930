"""Shared-prefix edge forwards (the pairs' common prefix computed once, each circuit runs only the positions from the
first difference on) give the full-prompt runner's numbers: evaluate_masks and EAP / EAP-IG, share_prefix=True vs
False, on the planted model, a tiny GPT-2 and a tiny grouped-query Llama (float64 copies where the span is small)."""

from __future__ import annotations

import pytest
import torch

from wordpos.patching.eap import score_edges
from wordpos.patching.edge_graph import EdgeGraph
from wordpos.patching.edge_runner import EdgeRunner, evaluate_masks
from wordpos.probing.engines.split_inputs import kv_cache_passthrough, prefix_kv_unsupported

TOL = 1e-5


@pytest.fixture(scope="module")
def planted64_ctx(planted_model, planted_ctx):
    """A float64 copy of the planted model (the session's float32 one is left alone): in float32 the full-prompt
    runner's own patched and plain runs already differ by ~1e-5 in normalised units. Loaded afresh from the
    session's build (a deepcopy fails once other tests have run the shared bridge with gradients)."""
    from wordpos.patching import prepare
    from wordpos.probing import load_model

    model = load_model("planted", device="cpu").to(torch.float64)
    return model, prepare(model, planted_ctx.pairs, planted_ctx.probe)


@pytest.fixture(scope="module", params=["planted", "gpt2", "llama"])
def model_ctx(request):
    return request.getfixturevalue(f"{request.param}64_ctx" if request.param == "planted" else f"{request.param}_ctx")


def _masks(g: EdgeGraph) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    rand = [(torch.rand(g.n_writers, g.n_readers, generator=gen) < p) & g.valid for p in (0.1, 0.5, 0.9)]
    return torch.stack([g.full_mask(), g.empty_mask(), *rand])


def _plain_resid(model, tokens, layer):
    """resid_post of ``layer`` by a plain TransformerLens run of the full prompts."""
    store = {}
    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{layer}.hook_resid_post",
                                                 lambda a, hook: store.__setitem__("x", a))])
    return store["x"]


def test_prefix_route_taken_and_suffix_matches_full_run(model_ctx):
    model, ctx = model_ctx
    runner = EdgeRunner(model, ctx)
    assert runner.prefix_reason is None, runner.prefix_reason
    assert runner.lean is not None, runner.lean_reason  # every edge test here runs on the lean forward
    assert runner.p0 == ctx.first_diff_pos >= 1
    assert int(ctx.pairs.target_pos[ctx.pairs.target_mask].min()) >= runner.p0
    # the unpatched suffix on the cached prefix is the full prompt's residual (independent: a plain TL run)
    L = int(ctx.probe.layer)
    got = runner.forward(ctx.pairs.clean, runner.ablated, None)
    ref = _plain_resid(model, ctx.pairs.clean, L)
    assert got.shape == ref.shape
    tol = 1e-9 if ref.dtype == torch.float64 else 1e-4
    assert (got - ref).abs().max().item() <= tol * max(1.0, ref.abs().max().item())
    # the passthrough is removed again
    assert all("_update_kv_cache" not in b.attn.__dict__ for b in model.blocks)


@pytest.mark.parametrize("ablation", ["counterfactual", "mean", "resample"])
def test_evaluate_masks_shared_equals_full(model_ctx, ablation):
    model, ctx = model_ctx
    g = EdgeGraph.for_model(ctx.engine.dims, int(ctx.probe.layer))
    masks = _masks(g)
    shared = evaluate_masks(model, ctx, masks, ablation=ablation)
    full = evaluate_masks(model, ctx, masks, ablation=ablation, share_prefix=False)
    for a, b in ((shared.values, full.values), (shared.full, full.full), (shared.empty, full.empty)):
        assert torch.allclose(a, b, atol=TOL, rtol=0), (a - b).abs().max()
    # the circuits do differ from one another (the comparison is not vacuous)
    assert (full.values[2:] - full.full).abs().max() > 1e-3


def test_chunked_shared_forwards_equal_one_pass(gpt2_ctx):
    model, ctx = gpt2_ctx
    g = EdgeGraph.for_model(ctx.engine.dims, 1)
    masks = _masks(g)
    T = ctx.pairs.clean.shape[1]
    full = evaluate_masks(model, ctx, masks, share_prefix=False)
    small = evaluate_masks(model, ctx, masks, max_tokens=2 * T)  # few pairs, one circuit per forward
    assert torch.allclose(small.values, full.values, atol=TOL, rtol=0)


@pytest.mark.parametrize("method", ["eap", "eap-ig"])
def test_score_edges_shared_equals_full(model_ctx, method):
    model, ctx = model_ctx
    shared = score_edges(model, ctx, method, steps=3)
    full = score_edges(model, ctx, method, steps=3, share_prefix=False)
    v = shared.graph.valid
    a, b = shared.scores[v], full.scores[v]
    assert torch.allclose(a, b, atol=TOL, rtol=0), (a - b).abs().max()
    assert b.abs().max() > 1e-3


def test_exact_scores_shared_equals_full(gpt2_ctx):
    model, ctx = gpt2_ctx
    edges = ["input->a1.h0<q>", "a0.h1->a1.h2<v>", "m0->probe", "a0.h3->m0"]
    a = EdgeRunner(model, ctx).exact_scores(edges)
    b = EdgeRunner(model, ctx, share_prefix=False).exact_scores(edges)
    idx = [a.graph.edge(e) for e in edges]
    for w, r in idx:
        assert float(a.scores[w, r]) == pytest.approx(float(b.scores[w, r]), abs=TOL)


def test_fallbacks_are_logged(gpt2_ctx, caplog):
    model, ctx = gpt2_ctx
    r = EdgeRunner(model, ctx, share_prefix=False)
    assert r.p0 == 0 and r.prefix_reason == "share_prefix=False"
    # an engine that is neither a bridge nor a local nnsight model says why
    assert "neither the TransformerLens nor the nnsight engine" in prefix_kv_unsupported(object())
    # prompts that differ from position 0 on: nothing to share, full prompts, reason logged
    from dataclasses import replace

    pairs = ctx.pairs
    corrupted = pairs.corrupted.clone()
    corrupted[:, 0] = (corrupted[:, 0] + 1) % 100
    ctx0 = replace(ctx, pairs=replace(pairs, corrupted=corrupted))
    with caplog.at_level("INFO", logger="wordpos.patching.edge_runner"):
        r = EdgeRunner(model, ctx0)
    assert r.p0 == 0 and "first position" in r.prefix_reason
    assert "first position" in caplog.text


def test_passthrough_restores_attention(gpt2_ctx):
    model, ctx = gpt2_ctx
    eng = ctx.engine
    with kv_cache_passthrough(eng):
        assert all("_update_kv_cache" in b.attn.__dict__ for b in model.blocks)
    assert all("_update_kv_cache" not in b.attn.__dict__ for b in model.blocks)


class _Forwards:
    """Counts forwards: through the bridge's block 0 (every full, prefix and suffix run passes it once) and through
    the runner's lean blocks."""

    def __init__(self, model):
        self.n, self.model = 0, model

    def __enter__(self):
        from wordpos.probing.engines.lean import LeanBlocks

        self.h = self.model.blocks[0].register_forward_hook(lambda *a: setattr(self, "n", self.n + 1))
        self.orig = LeanBlocks.forward

        def counted(blocks, *a, **k):
            self.n += 1
            return self.orig(blocks, *a, **k)

        LeanBlocks.forward = counted
        return self

    def __exit__(self, *exc):
        self.h.remove()
        from wordpos.probing.engines.lean import LeanBlocks

        LeanBlocks.forward = self.orig


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_context_caches_replace_the_runners_own_forwards(request, name):
    """With ``prepare(full_base_cache=True)`` the runner takes both runs' writer outputs and the shared prefix from
    the context: one forward (the check of the lean forward on the prefix) instead of four, and the same ablated outputs, circuit values and
    EAP scores as a runner that computes them itself (a context without caches)."""
    from wordpos.patching import prepare

    model, ctx = request.getfixturevalue(f"{name}_ctx")
    bare = prepare(model, ctx.pairs, ctx.probe, reuse_prefix=False)  # no keys/values, base residuals only
    full = prepare(model, ctx.pairs, ctx.probe, full_base_cache=True)
    with _Forwards(model) as fw_bare:
        r_bare = EdgeRunner(model, bare)
    with _Forwards(model) as fw_full:
        r_full = EdgeRunner(model, full)
    assert r_full.prefix_reason is None and r_full.p0 == r_bare.p0 >= 1
    # bare: the corrupted writers, the prefix, a full run and the lean forward to check both. From the context:
    # the lean forward's check alone (on the base run, whose output the context holds)
    assert fw_full.n == 1 and fw_bare.n == 4, (fw_full.n, fw_bare.n)
    # the writers' outputs from the caches equal a fresh forward's (the runner's own route)
    tol = 1e-9
    assert torch.allclose(r_full.ablated, r_bare.writer_outputs(ctx.pairs.corrupted), atol=tol, rtol=0)
    with _Forwards(model) as fw:
        clean = r_full.run_outputs("clean")
    assert fw.n == 0 and torch.allclose(clean, r_bare.writer_outputs(ctx.pairs.clean), atol=tol, rtol=0)
    # and every downstream number: circuits, the full model, EAP scores
    masks = _masks(r_full.graph)
    a, b = r_full.evaluate(masks), r_bare.evaluate(masks)
    for x, y in ((a.values, b.values), (a.full, b.full), (a.empty, b.empty)):
        assert torch.allclose(x, y, atol=TOL, rtol=0), (x - y).abs().max()
    with _Forwards(model) as fw:
        sa = score_edges(model, full, "eap", runner=r_full)
    sb = score_edges(model, bare, "eap", runner=r_bare)
    v = sa.graph.valid
    assert torch.allclose(sa.scores[v], sb.scores[v], atol=TOL, rtol=0) and sb.scores[v].abs().max() > 1e-3
    assert fw.n == 1  # EAP's one gradient forward; the clean writer outputs came from the context


def test_context_of_other_prompts_is_not_used(gpt2_ctx):
    """A context whose base prompts do not start like the pairs (a user's swapped pairs) gives no prefix: the
    runner computes its own."""
    from dataclasses import replace

    model, ctx = gpt2_ctx
    other = replace(ctx, base=ctx.base.flip(1))
    r = EdgeRunner(model, other)
    assert r._context_prefix(r.p0) is None and r.prefix_reason is None
    # the lean check does not read the other prompts' run either (its prefix rows are the pairs'): it is taken
    assert r._context_base(r.p0) is None and r.lean is not None, r.lean_reason
    ref = _plain_resid(model, ctx.pairs.clean, int(ctx.probe.layer))
    got = r.forward(ctx.pairs.clean, r.ablated, None)
    assert (got - ref).abs().max().item() <= 1e-9 * max(1.0, ref.abs().max().item())


def test_context_caches_follow_the_direction(gpt2_ctx):
    """A noising context caches the corrupted run as its source and the clean one as its base: the runner still
    ablates with the corrupted run's writers and reads the clean ones as clean."""
    from wordpos.patching import prepare

    model, ctx = gpt2_ctx
    noising = prepare(model, ctx.pairs, ctx.probe, direction="noising", full_base_cache=True)
    r = EdgeRunner(model, noising)
    ref = EdgeRunner(model, ctx, share_prefix=False)
    assert torch.allclose(r.ablated, ref.writer_outputs(ctx.pairs.corrupted), atol=1e-9, rtol=0)
    assert torch.allclose(r.run_outputs("clean"), ref.writer_outputs(ctx.pairs.clean), atol=1e-9, rtol=0)
    assert (r.ablated - r.run_outputs("clean")).abs().max() > 1e-3


def test_lean_failure_falls_back_to_the_checked_bridge_route(gpt2_ctx, caplog, monkeypatch):
    """When the lean forward fails its check, the runner says why, checks the bridge's suffix route it then uses,
    and gives the bridge's numbers."""
    from wordpos.probing.engines.lean import LeanBlocks

    model, ctx = gpt2_ctx
    orig = LeanBlocks.forward
    monkeypatch.setattr(LeanBlocks, "forward", lambda self, resid, **k: orig(self, resid, **k) + 1.0)  # a broken forward
    with caplog.at_level("INFO", logger="wordpos.patching.edge_runner"):
        r = EdgeRunner(model, ctx)
    assert r.lean is None and "lean forward differs" in r.lean_reason and "lean forward differs" in caplog.text
    assert r.prefix_reason is None and r.p0 >= 1  # the bridge's suffix route, checked and kept
    masks = _masks(r.graph)
    ref = EdgeRunner(model, ctx, lean=False).evaluate(masks)
    assert torch.allclose(r.evaluate(masks).values, ref.values, atol=TOL, rtol=0)


@pytest.mark.parametrize("case", [("gpt2_ctx", 1e-5, TOL), ("tiny_ctx", 2e-3, 1e-4)], ids=["float64", "float32"])
def test_suffix_route_check_is_per_position(case, request, caplog, monkeypatch):
    """The bridge's suffix route (no lean forward) is checked position by position against a plain run: an error
    of a small share of the weakest position's norm is caught (in float32, 2e-3 of it: ~6e-5 per element, which the
    old bound of 1e-4 of the residual's largest value let through), and the runner runs full prompts with the
    numbers of a runner that never shared a prefix."""
    import wordpos.patching.edge_runner as ER

    fixture, share, tol = case
    got = request.getfixturevalue(fixture)
    model, ctx = got if isinstance(got, tuple) else (got.engine, got)
    orig = ER.run_suffix

    def nudged(*a, **k):
        out = orig(*a, **k).clone()
        small = int(out[0].norm(dim=-1).argmin())
        out[0, small] += share * out[0, small].norm() / out.shape[-1] ** 0.5
        return out

    monkeypatch.setattr(ER, "run_suffix", nudged)
    with caplog.at_level("INFO", logger="wordpos.patching.edge_runner"):
        r = EdgeRunner(model, ctx, lean=False)
    assert r.p0 == 0 and "of a position's norm" in r.prefix_reason and "cached-prefix run differs" in caplog.text
    masks = _masks(r.graph)
    ref = EdgeRunner(model, ctx, lean=False, share_prefix=False).evaluate(masks)
    assert torch.allclose(r.evaluate(masks).values, ref.values, atol=tol, rtol=0)
    monkeypatch.setattr(ER, "run_suffix", orig)
    assert EdgeRunner(model, ctx, lean=False).p0 >= 1  # unbroken, the route is kept


def test_lean_forward_refuses_other_tokens(gpt2_ctx):
    """The lean forward's layer-0 input is the pairs' cached clean residual: other tokens are refused, not ignored."""
    from wordpos.probing.errors import ConfigError

    model, ctx = gpt2_ctx
    r = EdgeRunner(model, ctx)
    with pytest.raises(ConfigError, match="clean prompts"):
        r.forward(ctx.pairs.corrupted, r.ablated, None)
    assert EdgeRunner(model, ctx, lean=False).forward(ctx.pairs.corrupted, r.ablated, None).shape[0] == len(ctx.pairs)
