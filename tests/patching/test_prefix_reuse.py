"""Patched forwards that skip what a patch cannot change (issue 14): blocks before ``start_at_layer`` and positions
before the patch (run on the base run's cached keys/values). References: the full-prompt path of the same runner
(``prepare(..., reuse_prefix=False)``, itself checked against TransformerLens' patching in test_activation) and
plain TransformerLens hook runs; float64 GPT-2 and grouped-query Llama, through the TransformerLens engine and the
nnsight engine (which runs on the Hugging Face model's own key/value cache)."""

import numpy as np
import pytest
import torch

from wordpos.patching import patch_heads, patch_layer_outputs, patch_resid, prepare
from wordpos.patching.path import path_patch_direct, path_patch_edges
from wordpos.probing import as_engine, hooks


@pytest.fixture(scope="module", params=["gpt2", "llama", "gpt2-nnsight", "llama-nnsight"])
def both(request, gpt2_ctx, llama_ctx, tiny_pairs):
    model, ctx = gpt2_ctx if request.param.startswith("gpt2") else llama_ctx
    if request.param.endswith("nnsight"):
        from wordpos.probing.engines import make_engine

        model = make_engine(model, "nnsight")  # the same weights, through nnsight and the Hugging Face model
        ctx = prepare(model, tiny_pairs, ctx.probe)
    full = prepare(model, tiny_pairs, ctx.probe, reuse_prefix=False)
    return model, ctx, full


@pytest.fixture(scope="module")
def tl_full(gpt2_ctx, llama_ctx, tiny_pairs):
    """Per architecture, the TransformerLens engine's full-prompt context: the reference for the nnsight routes."""
    return {name: prepare(m, tiny_pairs, c.probe, reuse_prefix=False)
            for name, (m, c) in (("gpt2", gpt2_ctx), ("llama", llama_ctx))}


def test_contexts_differ_only_in_the_cache(both):
    _, ctx, full = both
    assert ctx.base_kv is not None and full.base_kv is None
    assert 0 < ctx.first_diff_pos < ctx.pairs.clean.shape[1]  # there is a prefix to skip


def record_runs(engine, monkeypatch) -> list:
    """Spy on ``engine.run``: one ``(positions run, start_at_layer, cached positions or None)`` per forward. (The
    nnsight engine's runs that fill a Hugging Face cache for later count as uncached.) The runner's hook-free route
    for head edits is turned off, so that every forward goes through ``engine.run`` (tests/patching/test_lean_route.py
    checks the route's own positions and start layers)."""
    from wordpos.patching import lean_route

    monkeypatch.setattr(lean_route, "ENABLED", False)
    calls, real = [], engine.run

    def spy(inputs, **kw):
        past = kw.get("past")
        calls.append((int(inputs.shape[1]), kw.get("start_at_layer"), getattr(past, "length", None)))
        return real(inputs, **kw)

    monkeypatch.setattr(engine, "run", spy)
    return calls


@pytest.mark.parametrize("sweep", ["heads", "heads_by_pos", "resid", "mlp_by_pos", "path_direct",
                                   "path_direct_forward", "path_edges", "path_edges_frozen_mlps"])
def test_skipping_positions_gives_the_full_prompt_answer(both, sweep):
    model, ctx, full = both
    run = {"heads": lambda c: patch_heads(model, c, progress=False),
           "heads_by_pos": lambda c: patch_heads(model, c, by_pos=True, progress=False),
           "resid": lambda c: patch_resid(model, c, progress=False),
           "mlp_by_pos": lambda c: patch_layer_outputs(model, c, by_pos=True, progress=False),
           "path_direct": lambda c: path_patch_direct(model, c, progress=False),
           "path_direct_forward": lambda c: path_patch_direct(model, c, route="forward", progress=False),
           "path_edges": lambda c: path_patch_edges(model, c, progress=False),
           "path_edges_frozen_mlps": lambda c: path_patch_edges(model, c, freeze_mlps=True, progress=False)}[sweep]
    a, b = run(ctx).effects, run(full).effects
    assert np.isfinite(b).sum() > 0 and np.array_equal(np.isnan(a), np.isnan(b))
    assert np.nanmax(np.abs(a - b)) < 1e-9
    assert np.nanmax(np.abs(b)) > 1e-3  # the sweep measured something


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("sweep", ["heads_by_pos", "resid", "mlp_by_pos"])
def test_nnsight_on_cached_keys_values_gives_transformerlens_full_prompt_answer(arch, sweep, gpt2_ctx, llama_ctx,
                                                                                 tiny_pairs, tl_full, monkeypatch):
    """The nnsight engine's by-position sweeps on the base run's cached keys/values (the Hugging Face model's own
    cache) equal the TransformerLens engine's sweeps over full prompts (float64), and really run the suffixes."""
    from wordpos.probing.engines import make_engine

    model, ctx = gpt2_ctx if arch == "gpt2" else llama_ctx
    nn = make_engine(model, "nnsight")
    nctx = prepare(nn, tiny_pairs, ctx.probe)
    assert nctx.base_kv is not None
    run = {"heads_by_pos": lambda m, c: patch_heads(m, c, by_pos=True, progress=False),
           "resid": lambda m, c: patch_resid(m, c, progress=False),
           "mlp_by_pos": lambda m, c: patch_layer_outputs(m, c, by_pos=True, progress=False)}[sweep]
    calls = record_runs(nn, monkeypatch)
    a = run(nn, nctx).effects
    b = run(model, tl_full[arch]).effects
    assert np.array_equal(np.isnan(a), np.isnan(b)) and np.isfinite(b).sum() > 0
    assert np.nanmax(np.abs(a - b)) < 1e-9 and np.nanmax(np.abs(b)) > 1e-3
    assert any(past for _, _, past in calls)  # positions before the patch came from the cache


def test_forwards_run_only_from_the_patch_on(both, monkeypatch):
    model, ctx, _ = both
    engine = ctx.engine
    widths = record_runs(engine, monkeypatch)
    res = patch_resid(model, ctx, max_tokens=1, progress=False)  # one patch per forward: each has its own start
    T = ctx.pairs.clean.shape[1]
    assert len(widths) == ctx.stop_at_layer * len(ctx.sweep_positions()) and res.effects.shape[1] == T
    for width, _, past in widths:  # a patch at position p runs T - p positions on p cached ones
        assert past and width + past == T
    assert sorted({T - w for w, _, _ in widths}) == list(ctx.sweep_positions())



def test_path_patching_step_2_runs_only_after_the_first_difference(both, monkeypatch):
    """Step 1 records the receivers' q/k/v over whole prompts (it reads a cache); step 2 writes them back and runs
    only from the first clean/corrupted difference on, on the base run's cached keys/values."""
    model, ctx, _ = both
    fresh = prepare(model, ctx.pairs, ctx.probe)
    calls = record_runs(fresh.engine, monkeypatch)
    path_patch_edges(model, fresh, progress=False)
    T, p0 = fresh.pairs.clean.shape[1], fresh.first_diff_pos
    step2 = [c for c in calls if c[2] is not None]
    assert step2 and all(w == T - p0 and past == p0 for w, _, past in step2)
    assert all(w == T for w, _, past in calls if past is None)  # base runs and step 1: whole prompts


def test_path_patching_step_2_checks_what_it_skips(gpt2_ctx, tiny_pairs, monkeypatch, caplog):
    """If step 1's values differed from the base run's before the first difference (here: forced), step 2 says so
    and runs whole prompts, with the full-prompt answer."""
    from wordpos.patching import path as path_mod

    model, ctx = gpt2_ctx
    full = path_patch_edges(model, prepare(model, tiny_pairs, ctx.probe, reuse_prefix=False), progress=False).effects
    same_before = path_mod._same_before
    monkeypatch.setattr(path_mod, "_same_before", lambda *a: False)
    fresh = prepare(model, tiny_pairs, ctx.probe)
    calls = record_runs(fresh.engine, monkeypatch)
    with caplog.at_level("WARNING", logger="wordpos.patching.path"):
        got = path_patch_edges(model, fresh, progress=False).effects
    assert "step 2 runs whole prompts" in caplog.text and all(past is None for _, _, past in calls)
    assert np.nanmax(np.abs(got - full)) < 1e-9
    assert same_before({"0.1|x": torch.ones(2, 3, 1)}, {"x": torch.ones(2, 3, 1)}, 2)
    assert not same_before({"0.1|x": torch.ones(2, 3, 1)}, {"x": torch.zeros(2, 3, 1)}, 2)

@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_start_at_layer_skips_the_blocks_before(arch, gpt2_ctx, llama_ctx):
    """``TLEngine.run(start_at_layer=k)`` matches a plain TransformerLens run and never runs blocks 0..k-1. (The
    nnsight engine's ``start_at_layer``: tests/probing/test_engine_nnsight.py.)"""
    model, ctx = gpt2_ctx if arch == "gpt2" else llama_ctx
    engine = as_engine(model)
    tokens = ctx.pairs.clean
    k, n = 1, engine.dims.n_layers
    with torch.no_grad():
        _, ref = model.run_with_cache(tokens, names_filter=[hooks.resid(k, "resid_pre"), hooks.resid(n - 1)])
    calls = []
    handle = model.blocks[0].original_component.register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad():
            out, _ = engine.run(ref[hooks.resid(k, "resid_pre")], start_at_layer=k, stop_at_layer=n)
    finally:
        handle.remove()
    assert calls == []
    assert (out - ref[hooks.resid(n - 1)]).abs().max() < 1e-10
    with torch.no_grad():  # and the blocks run again afterwards
        again, _ = engine.run(tokens, stop_at_layer=n)
    assert (again - ref[hooks.resid(n - 1)]).abs().max() < 1e-10


@pytest.mark.parametrize("method", ["resample", "mean", "zero"])
def test_ablation_skipping_gives_the_full_prompt_answer(both, small_data, method):
    """Ablated forwards that start at the first ablated layer (and, for resample ablation, after the prefix every
    prompt shares) equal forwards of every prompt from its first token."""
    from wordpos.patching.ablation import ablated_sets, head_means

    model, ctx, _ = both
    engine = as_engine(model)
    prompts = small_data.test
    sets = [[], [(1, 0)], [(1, 2), (1, 3)], [(0, 1), (1, 1)], [(0, 3)]]
    if method != "resample":  # sets only in layer 0: nothing to start later from, nothing cached
        layer0 = ablated_sets(engine, 1, prompts, [[], [(0, 1)]], method,
                              head_means(engine, small_data.train, [0], length=prompts.max_len())
                              if method == "mean" else None)
        assert (layer0 - ablated_sets(engine, 1, prompts, [[], [(0, 1)]], method,
                                      head_means(engine, small_data.train, [0], length=prompts.max_len())
                                      if method == "mean" else None, skip=False)).abs().max() < 1e-9
    means = head_means(engine, small_data.train, [0, 1], length=prompts.max_len()) if method == "mean" else None
    fast = ablated_sets(engine, 1, prompts, sets, method, means, seed=3)
    full = ablated_sets(engine, 1, prompts, sets, method, means, seed=3, skip=False)
    assert fast.shape == full.shape and (full[1:] - full[0]).abs().max() > 1e-3  # the ablations change something
    assert (fast - full).abs().max() < 1e-9


def test_resample_ablation_runs_only_after_the_shared_prefix(both, small_data, monkeypatch):
    from wordpos.patching.ablation import ablated_sets

    model, _, _ = both
    engine = as_engine(model)
    prompts = small_data.test
    T = prompts.max_len()
    shared = int((prompts.tokens[:, :T] != prompts.tokens[:1, :T]).any(0).nonzero().min())
    calls = record_runs(engine, monkeypatch)
    ablated_sets(engine, 1, prompts, [[], [(1, 0)], [(1, 2)]], "resample", seed=0)
    patched = [c for c in calls if c[2] is not None]
    assert shared >= 1 and patched and all(w == T - shared and start == 1 for w, start, _ in patched)


@pytest.mark.parametrize("method", ["mean", "zero"])
def test_ablation_starts_at_the_first_ablated_layer(both, small_data, monkeypatch, method):
    """Mean and zero ablation change the shared prefix too, so they run every position (no cached keys/values), but
    each set still starts at its first ablated layer."""
    from wordpos.patching.ablation import ablated_sets, head_means

    model, _, _ = both
    engine = as_engine(model)
    prompts = small_data.test
    means = head_means(engine, small_data.train, [1], length=prompts.max_len()) if method == "mean" else None
    calls = record_runs(engine, monkeypatch)
    ablated_sets(engine, 1, prompts, [[], [(1, 0)], [(1, 2)]], method, means)
    patched = [c for c in calls if c[1] is not None]
    assert patched and all(start == 1 and past is None and w == prompts.max_len() for w, start, past in patched)


@pytest.mark.parametrize("sweep", ["heads", "heads_by_pos", "resid", "path_direct", "path_edges"])
def test_accelerator_coalescing_of_start_layers_gives_the_same_answer(both, sweep, monkeypatch):
    """On an accelerator the runner merges small groups of interventions that start at different layers into one
    forward from the earliest (``runner._coalesce``). Forced here on the CPU: the same effects as one forward per
    start layer (1e-9, float64), in fewer forwards where there were several start layers to merge."""
    from wordpos.patching import runner
    from wordpos.patching.path import path_patch_edges

    model, ctx, _ = both
    run = {"heads": lambda c: patch_heads(model, c, progress=False),
           "heads_by_pos": lambda c: patch_heads(model, c, by_pos=True, progress=False),
           "resid": lambda c: patch_resid(model, c, progress=False),
           "path_direct": lambda c: path_patch_direct(model, c, route="forward", progress=False),
           "path_edges": lambda c: path_patch_edges(model, c, progress=False)}[sweep]
    fresh = lambda: prepare(model, ctx.pairs, ctx.probe)  # noqa: E731 - a context remembers its sweeps
    c1, c2 = fresh(), fresh()
    calls = record_runs(c1.engine, monkeypatch)
    apart = run(c1).effects
    n_apart = len(calls)
    calls = record_runs(c2.engine, monkeypatch)
    monkeypatch.setattr(runner, "_launch_bound", lambda device: True)
    merged = run(c2).effects
    assert np.array_equal(np.isnan(apart), np.isnan(merged)) and np.isfinite(apart).sum() > 0
    assert np.nanmax(np.abs(apart - merged)) < 1e-9
    assert len(calls) <= n_apart
    if sweep in ("heads", "path_direct"):  # heads of both layers: two start layers became one forward
        assert len(calls) < n_apart and min(c[1] or 0 for c in calls) == 0
