import numpy as np
import pytest
import torch

from patching import attribute_heads, attribute_resid, correlation, patch_heads, patch_resid, path_patch_direct, \
    path_patch_edges
from probing import ConfigError, hooks


def test_direct_path_equals_the_output_projection_of_the_patched_head(tiny_model, tiny_pairs, tiny_ctx):
    """Independent reference: with everything downstream frozen, the probe sees base + Δz_h · W_O[h]."""
    res = path_patch_direct(tiny_model, tiny_ctx, progress=False)
    with torch.no_grad():
        _, cor = tiny_model.run_with_cache(tiny_pairs.corrupted)
        _, cln = tiny_model.run_with_cache(tiny_pairs.clean)
    base = cor[hooks.resid(1)]
    for L in range(2):
        for h in range(4):
            dz = cln[hooks.attn_z(L)][:, :, h] - cor[hooks.attn_z(L)][:, :, h]
            expected = tiny_ctx.metric(base + dz @ tiny_model.W_O[L, h])
            assert abs(float(expected.detach()) - res.effects[L, h]) < 1e-4


def test_edges_are_nan_where_the_sender_is_not_before_the_receiver(tiny_model, tiny_ctx):
    res = path_patch_edges(tiny_model, tiny_ctx, receivers=[(1, 0), (1, 3)], progress=False)
    assert res.effects.shape == (2, 4, 2, 4, 3)
    assert np.isfinite(res.effects[0, :, 1, [0, 3]]).all()
    assert np.isnan(res.effects[1]).all() and np.isnan(res.effects[:, :, 1, 1]).all()


def test_edge_via_value_matches_a_hand_built_two_step_run(tiny_model, tiny_pairs, tiny_ctx):
    res = path_patch_edges(tiny_model, tiny_ctx, receivers=[(1, 2)], senders=[(0, 1)], via=("v",), progress=False)
    with torch.no_grad():
        _, cor = tiny_model.run_with_cache(tiny_pairs.corrupted)
        _, cln = tiny_model.run_with_cache(tiny_pairs.clean)

        def patch_sender(act, hook):  # step 1: sender 0.1 clean, every other head frozen (none later here)
            act = act.clone()
            act[:, :, 1] = cln[hooks.attn_z(0)][:, :, 1]
            return act

        step1 = {}
        tiny_model.run_with_hooks(tiny_pairs.corrupted, fwd_hooks=[
            (hooks.attn_z(0), patch_sender),
            (hooks.attn_qkv(1, "v"), lambda a, hook: step1.setdefault(hooks.attn_qkv(1, "v"), a))])

        def patch_v(act, hook):  # step 2: only receiver 1.2's values from step 1
            act = act.clone()
            act[:, :, 2] = step1[hooks.attn_qkv(1, "v")][:, :, 2]
            return act

        out = tiny_model.run_with_hooks(tiny_pairs.corrupted, fwd_hooks=[(hooks.attn_qkv(1, "v"), patch_v)],
                                        stop_at_layer=None)
        holder = {}
        tiny_model.run_with_hooks(tiny_pairs.corrupted, fwd_hooks=[
            (hooks.attn_qkv(1, "v"), patch_v), (hooks.resid(1), lambda a, hook: holder.setdefault("r", a))])
    assert out.shape[-1] == 50257
    assert abs(float(tiny_ctx.metric(holder["r"])) - res.effects[0, 1, 1, 2, 0]) < 1e-4


def test_attribution_tracks_activation_patching(tiny_model, tiny_ctx):
    act = patch_heads(tiny_model, tiny_ctx, progress=False)
    att = attribute_heads(tiny_model, tiny_ctx)
    assert att.effects.shape == act.effects.shape
    assert correlation(att, act) > 0.9
    by_pos = attribute_heads(tiny_model, tiny_ctx, by_pos=True)
    assert np.allclose(by_pos.effects.sum(-1), att.effects, atol=1e-6)  # denoising: unpatched value is 0
    assert correlation(attribute_resid(tiny_model, tiny_ctx), patch_resid(tiny_model, tiny_ctx, progress=False)) > 0.8


def test_path_patching_bad_input(tiny_model, tiny_ctx):
    with pytest.raises(ConfigError, match="out of range"):
        path_patch_edges(tiny_model, tiny_ctx, receivers=[(1, 7)], progress=False)
    with pytest.raises(ConfigError, match="at least one"):
        path_patch_edges(tiny_model, tiny_ctx, receivers=[], progress=False)
    with pytest.raises(ConfigError, match="via"):
        path_patch_edges(tiny_model, tiny_ctx, receivers=[(1, 0)], via=("x",), progress=False)
