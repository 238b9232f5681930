import numpy as np
import pytest
import torch

from wordpos.patching import attribute_heads, attribute_resid, correlation, patch_heads, patch_resid, path_patch_direct, \
    path_patch_edges
from wordpos.probing import ConfigError, hooks


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



@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("direction, metric", [("denoising", "logit_diff"), ("noising", "projection")])
def test_direct_path_closed_form_equals_the_frozen_forwards(arch, direction, metric, gpt2_ctx, llama_ctx, tiny_pairs):
    """The closed form (base residual + Δz_h · W_O[h]) equals the runner's frozen forwards and hand-built frozen
    runs (sender patched, later heads and the MLPs from its layer on set to the base run's), float64, GPT-2 and
    grouped-query Llama; the nnsight engine (no W_O) takes the forward route and agrees."""
    from wordpos.patching import prepare
    from wordpos.probing import as_engine
    from wordpos.probing.engines import make_engine

    model, ctx = gpt2_ctx if arch == "gpt2" else llama_ctx
    c = prepare(model, tiny_pairs, ctx.probe, metric=metric, direction=direction)
    a = path_patch_direct(model, c, progress=False)
    b = path_patch_direct(model, prepare(model, tiny_pairs, ctx.probe, metric=metric, direction=direction),
                          route="forward", progress=False)
    assert a.config["route"] == "closed_form" and b.config["route"] == "forward"
    assert np.isfinite(a.effects).all() and np.abs(a.effects - b.effects).max() < 1e-9
    assert np.abs(b.effects).max() > 1e-3
    engine, n = as_engine(model), c.stop_at_layer
    with torch.no_grad():
        _, base = engine.run(c.base, cache=[hooks.attn_z(L) for L in range(n)] + [hooks.mlp_out(L) for L in range(n)],
                             stop_at_layer=n)
        for s, h in [(0, 1), (1, 2), (n - 1, 3)]:
            def sender(z, name, s=s, h=h):
                z = z.clone()
                z[:, :, h] = c.source_cache[hooks.attn_z(s)][:, :, h]
                return z

            fwd = [(hooks.attn_z(s), sender)]
            fwd += [(hooks.attn_z(L), lambda z, name: base[name]) for L in range(s + 1, n)]
            fwd += [(hooks.mlp_out(L), lambda x, name: base[name]) for L in range(s, n)]
            out, _ = engine.run(c.base, hooks=fwd, stop_at_layer=n)
            expected = float(c.metric(out)) - c.unpatched
            assert abs(expected - a.effects[s, h]) < 1e-9, (s, h)
    nn = make_engine(model, "nnsight")
    d = path_patch_direct(nn, prepare(nn, tiny_pairs, ctx.probe, metric=metric, direction=direction), progress=False)
    assert d.config["route"] == "forward" and np.abs(d.effects - a.effects).max() < 1e-9
    with pytest.raises(ConfigError, match="route"):
        path_patch_direct(model, c, route="linear", progress=False)


def test_direct_path_closed_form_falls_back_when_a_frozen_forward_disagrees(gpt2_ctx, tiny_pairs, monkeypatch, caplog):
    """An attention output that is not z · W_O (here: W_O as the closed form reads it, off by 1%) is caught by the
    check forward of the largest write; every sender then runs its frozen forward, with the forward route's
    numbers."""
    from wordpos.patching import prepare
    from wordpos.probing.engines import split_inputs

    model, ctx = gpt2_ctx
    want = path_patch_direct(model, prepare(model, tiny_pairs, ctx.probe), route="forward", progress=False)
    real = split_inputs.head_out_weights
    monkeypatch.setattr(split_inputs, "head_out_weights", lambda engine, layers=None: real(engine, layers) * 1.01)
    with caplog.at_level("WARNING", logger="wordpos.patching.path"):
        got = path_patch_direct(model, prepare(model, tiny_pairs, ctx.probe), progress=False)
    assert got.config["route"] == "forward" and "frozen forward differs" in caplog.text
    assert np.abs(got.effects - want.effects).max() < 1e-12


def test_direct_path_closed_form_stands_in_bfloat16(tiny_llama_ctx, tiny_pairs):
    """In bfloat16 the check forward's own rounding (it re-adds the whole residual over the layers after the
    sender) must not send the run down the forward route: on a 6-layer grouped-query Llama the closed form is taken,
    and it is no further from the float64 answer than the forward route."""
    from wordpos.patching import prepare

    model, ctx = tiny_llama_ctx(1, n_layers=6, hidden=128, intermediate=256)  # float64
    exact = path_patch_direct(model, ctx, route="forward", progress=False).effects
    model.to(torch.bfloat16)
    a = path_patch_direct(model, prepare(model, tiny_pairs, ctx.probe), progress=False)
    b = path_patch_direct(model, prepare(model, tiny_pairs, ctx.probe), route="forward", progress=False)
    assert a.config["route"] == "closed_form"
    assert np.abs(a.effects - exact).max() <= 2 * np.abs(b.effects - exact).max() + 1e-3

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
    # reference: TL's own autograd of the metric w.r.t. each head's output at the corrupted run, times the
    # clean − corrupted difference, summed by hand over prompts and head dimensions
    holder = {}
    with torch.no_grad():
        _, cln = tiny_model.run_with_cache(tiny_ctx.pairs.clean)
    zs = {}

    def keep_z(L):
        def hook(act, hook):
            act.retain_grad()
            zs[hooks.attn_z(L)] = act
            return act
        return hook

    tiny_model.run_with_hooks(tiny_ctx.pairs.corrupted, fwd_hooks=[
        (hooks.attn_z(0), keep_z(0)), (hooks.attn_z(1), keep_z(1)),
        (hooks.resid(1), lambda a, hook: holder.setdefault("r", a))])
    tiny_ctx.metric(holder["r"]).sum().backward()
    for L in range(2):
        z = zs[hooks.attn_z(L)]
        ref = ((cln[hooks.attn_z(L)] - z.detach()) * z.grad).sum(dim=(0, 3))  # [pos, head]
        assert np.allclose(by_pos.effects[L], ref.T.double().numpy(), atol=1e-5)
        assert np.allclose(att.effects[L], ref.sum(0).double().numpy(), atol=1e-5)
    assert correlation(attribute_resid(tiny_model, tiny_ctx), patch_resid(tiny_model, tiny_ctx, progress=False)) > 0.8


def test_path_patching_bad_input(tiny_model, tiny_ctx):
    with pytest.raises(ConfigError, match="out of range"):
        path_patch_edges(tiny_model, tiny_ctx, receivers=[(1, 7)], progress=False)
    with pytest.raises(ConfigError, match="at least one"):
        path_patch_edges(tiny_model, tiny_ctx, receivers=[], progress=False)
    with pytest.raises(ConfigError, match="via"):
        path_patch_edges(tiny_model, tiny_ctx, receivers=[(1, 0)], via=("x",), progress=False)


def test_edge_into_an_early_receiver_does_not_depend_on_later_receivers(gpt2_tok, small_data, tiny_pairs,
                                                                       tmp_path_factory):
    """With the probe two layers above the receiver, step 1 reads the receiver's q/k/v before the layers it would
    freeze: the edge 0.0 -> 1.1 is the same whether or not a layer-2 receiver is swept with it (a 3-layer model;
    this sweep used to be refused as "at or after the probe's layer")."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from wordpos.patching import prepare
    from wordpos.probing import WordIndexProbe, as_engine, collect_residuals, load_model

    torch.manual_seed(1)
    cfg = GPT2Config(n_layer=3, n_head=4, n_embd=64, n_positions=64, vocab_size=len(gpt2_tok), resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)
    path = tmp_path_factory.mktemp("tiny-gpt2-3l")
    GPT2LMHeadModel(cfg).eval().save_pretrained(path)
    gpt2_tok.save_pretrained(path)
    model = load_model(path, device="cpu")
    acts = collect_residuals(model, small_data, layers=[2], progress=False)
    probe = WordIndexProbe(layer=2, model=as_engine(model).name).fit(acts.train(2), acts.labels["train"])
    ctx = prepare(model, tiny_pairs, probe)
    alone = path_patch_edges(model, ctx, receivers=[(1, 1)], senders=[(0, 0)], progress=False)
    both = path_patch_edges(model, ctx, receivers=[(1, 1), (2, 3)], senders=[(0, 0)], progress=False)
    assert np.isfinite(alone.effects[0, 0, 1, 1]).all()
    np.testing.assert_allclose(alone.effects[0, 0, 1, 1], both.effects[0, 0, 1, 1], atol=1e-6)
