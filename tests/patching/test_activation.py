"""Activation patching against TransformerLens' own `patching` module, plus the engine's invariants."""

import numpy as np
import pytest
import torch
import transformer_lens.patching as tl_patching

from wordpos.patching import patch_heads, patch_layer_outputs, patch_resid, prepare
from wordpos.patching.batched import Patch, SweepCheckpoint, run_patches
from wordpos.probing import ConfigError, hooks


@pytest.fixture
def tl_reference(tiny_model, tiny_pairs, tiny_ctx):
    """TransformerLens' patching functions with the same normalised probe metric: a hook keeps the probe
    layer's residual of the latest forward, and the metric reads it."""
    holder = {}

    def grab(act, hook):
        holder["resid"] = act
        return act

    tiny_model.add_hook(hooks.resid(1), grab)
    with torch.no_grad():
        _, clean_cache = tiny_model.run_with_cache(tiny_pairs.clean)

    def metric(logits):
        return tiny_ctx.metric(holder["resid"])[0]

    yield clean_cache, metric
    tiny_model.reset_hooks()


def test_heads_all_positions_equal_transformer_lens(tiny_model, tiny_pairs, tiny_ctx, tl_reference):
    clean_cache, metric = tl_reference
    ours = patch_heads(tiny_model, tiny_ctx, progress=False)
    with torch.no_grad():
        ref = tl_patching.get_act_patch_attn_head_out_all_pos(tiny_model, tiny_pairs.corrupted, clean_cache, metric)
    assert ours.axes == ("layer", "head")
    assert np.abs(ours.effects - ref.double().numpy()).max() < 1e-4


def test_heads_by_position_equal_transformer_lens(tiny_model, tiny_pairs, tiny_ctx, tl_reference):
    clean_cache, metric = tl_reference
    ours = patch_heads(tiny_model, tiny_ctx, by_pos=True, progress=False)
    with torch.no_grad():
        ref = tl_patching.get_act_patch_attn_head_out_by_pos(tiny_model, tiny_pairs.corrupted, clean_cache, metric)
    assert np.abs(ours.effects - ref.double().permute(0, 2, 1).numpy()).max() < 1e-4


def test_resid_and_mlp_equal_transformer_lens(tiny_model, tiny_pairs, tiny_ctx, tl_reference):
    clean_cache, metric = tl_reference
    with torch.no_grad():
        ref_resid = tl_patching.get_act_patch_resid_pre(tiny_model, tiny_pairs.corrupted, clean_cache, metric)
        ref_mlp = tl_patching.get_act_patch_mlp_out(tiny_model, tiny_pairs.corrupted, clean_cache, metric)
    assert np.abs(patch_resid(tiny_model, tiny_ctx, progress=False).effects - ref_resid.double().numpy()).max() < 1e-4
    # TL's MLP sweep is per position (every position, including those our sweep skips as exact no-ops)
    ours_by_pos = patch_layer_outputs(tiny_model, tiny_ctx, by_pos=True, progress=False)
    assert ours_by_pos.axes == ("layer", "pos") and ref_mlp.shape == ours_by_pos.effects.shape
    assert np.abs(ours_by_pos.effects - ref_mlp.double().numpy()).max() < 1e-4
    # the all-position MLP patch against a plain hook run
    ours = patch_layer_outputs(tiny_model, tiny_ctx, progress=False).effects
    for L in range(2):
        with torch.no_grad():
            out = tiny_model.run_with_hooks(tiny_pairs.corrupted, fwd_hooks=[
                (hooks.mlp_out(L), lambda act, hook, L=L: clean_cache[hooks.mlp_out(L)])], stop_at_layer=None)
        assert abs(float(metric(out)) - ours[L]) < 1e-4


def test_noising_by_position_equals_transformer_lens(tiny_model, tiny_pairs, tiny_probe):
    """Noising: the clean run with corrupted head outputs patched in, every position (also those our sweep fills
    with the unpatched level without running) against TL; stored values are the change from the clean run (1)."""
    ctx = prepare(tiny_model, tiny_pairs, tiny_probe, direction="noising")
    holder = {}
    tiny_model.add_hook(hooks.resid(1), lambda act, hook: holder.__setitem__("resid", act) or act)
    try:
        with torch.no_grad():
            _, corr_cache = tiny_model.run_with_cache(tiny_pairs.corrupted)
            ref = tl_patching.get_act_patch_attn_head_out_by_pos(tiny_model, tiny_pairs.clean, corr_cache,
                                                                  lambda logits: ctx.metric(holder["resid"])[0])
    finally:
        tiny_model.reset_hooks()
    ours = patch_heads(tiny_model, ctx, by_pos=True, progress=False)
    assert ours.direction == "noising" and ctx.unpatched == pytest.approx(1.0, abs=1e-9)
    assert np.abs(ours.effects - (ref.double().permute(0, 2, 1).numpy() - 1.0)).max() < 1e-4
    assert np.abs(ours.extra["level"] - ref.double().permute(0, 2, 1).numpy()).max() < 1e-4


def test_batched_equals_one_patch_per_forward(gpt2_ctx):
    # float64: chunks of different widths (each starting at its own first patched position) round differently
    model, ctx = gpt2_ctx
    a = patch_heads(model, ctx, by_pos=True, max_tokens=1, progress=False)  # one patch per forward
    b = patch_heads(model, ctx, by_pos=True, max_tokens=10**7, progress=False)  # all in one forward
    assert np.abs(a.effects - b.effects).max() < 1e-9


def test_interrupted_sweep_resumes_from_checkpoints(tiny_model, tiny_ctx, tmp_path, monkeypatch):
    from wordpos.patching import lean_route

    monkeypatch.setattr(lean_route, "ENABLED", False)  # every forward through engine.run, which this test counts
    full = patch_heads(tiny_model, tiny_ctx, by_pos=True, max_tokens=1 << 20, progress=False)  # same chunks
    calls = {"n": 0}
    real_run = tiny_ctx.engine.run

    def crashing_run(*a, **k):
        calls["n"] += 1
        if calls["n"] > 1:
            raise KeyboardInterrupt
        return real_run(*a, **k)

    monkeypatch.setattr(tiny_ctx.engine, "run", crashing_run)
    with pytest.raises(KeyboardInterrupt):
        patch_heads(tiny_model, tiny_ctx, by_pos=True, max_tokens=1 << 20, checkpoint_dir=tmp_path, progress=False)
    saved = list(tmp_path.glob("*.npy"))
    assert len(saved) == 1  # the first layer's group finished and was saved
    calls["n"] = -10**6  # let the rest run; count what the resumed sweep recomputes
    resumed = patch_heads(tiny_model, tiny_ctx, by_pos=True, max_tokens=1 << 20, checkpoint_dir=tmp_path,
                          progress=False)
    assert calls["n"] == -10**6 + 1  # only the unfinished layer ran again
    assert np.abs(resumed.effects - full.effects).max() < 1e-6


def test_bad_patch_requests(tiny_model, tiny_ctx):
    with pytest.raises(ConfigError, match="out of range"):
        patch_heads(tiny_model, tiny_ctx, heads=[(0, 9)], progress=False)
    with pytest.raises(ConfigError, match="empty"):
        patch_heads(tiny_model, tiny_ctx, heads=[], progress=False)
    with pytest.raises(ConfigError, match="no patches"):
        run_patches(tiny_ctx.engine, tiny_ctx.base, tiny_ctx.source_cache, tiny_ctx.base_cache, [], tiny_ctx.metric,
                    stop_at_layer=2)
    with pytest.raises(ConfigError, match="probe's layer"):
        run_patches(tiny_ctx.engine, tiny_ctx.base, tiny_ctx.source_cache, tiny_ctx.base_cache, [Patch("z", 1, 0)],
                    tiny_ctx.metric, stop_at_layer=1)
    assert SweepCheckpoint(None, {}).get("x") is None


def test_probe_from_another_model_or_layer_is_refused(tiny_model, tiny_pairs, tiny_probe):
    import copy

    other = copy.deepcopy(tiny_probe)
    other.model = "gpt2"
    with pytest.raises(ConfigError, match="fitted on model"):
        prepare(tiny_model, tiny_pairs, other)
    other = copy.deepcopy(tiny_probe)
    other.layer = 7
    with pytest.raises(ConfigError, match="out of range"):
        prepare(tiny_model, tiny_pairs, other)
