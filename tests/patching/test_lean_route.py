"""The runner's hook-free route for head-output edits (patching.lean_route) against the bridge's hooks."""

import pytest
import torch

from wordpos.patching import lean_route
from wordpos.patching.ablation import ablated_sets, head_means
from wordpos.probing import WordIndexDataset, as_engine
from wordpos.probing.engines.lean import LeanBlocks


@pytest.fixture
def counted(monkeypatch):
    """Counts the lean blocks' forwards (the route's, not the edge runner's: no circuit runs here)."""
    calls = []
    forward = LeanBlocks.forward

    def wrapped(self, *a, **kw):
        calls.append(kw.get("first", 0))
        return forward(self, *a, **kw)

    monkeypatch.setattr(LeanBlocks, "forward", wrapped)
    return calls


def _sets(engine, layer, data, method, monkeypatch, enabled):
    monkeypatch.setattr(lean_route, "ENABLED", enabled)
    sets = [[], [(0, 1)], [(layer, 0), (0, 2)], [(layer, 1)], [(0, 0), (0, 3), (layer, 2)]]
    means = head_means(engine, data.train, list(range(layer + 1)), length=data.test.max_len()) \
        if method == "mean" else None
    return ablated_sets(engine, layer, data.test, sets, method, means, seed=3)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("method", ["zero", "mean", "resample"])
def test_ablated_residuals_on_the_lean_route_equal_the_bridges(arch, method, gpt2_ctx, llama_ctx, gpt2_tok,
                                                               counted, monkeypatch):
    """Every head set of every ablation, computed in float64, on GPT-2 (LayerNorm, learned positions) and a
    grouped-query Llama (RMSNorm, RoPE): the same residuals as the hooks give, the route taken from the tokens (sets
    with a layer-0 head) and from a cached residual (the rest), resample ablation after the shared prefix on its
    cached keys and values."""
    model = (gpt2_ctx if arch == "gpt2" else llama_ctx)[0]
    engine = as_engine(model)
    layer = engine.dims.n_layers - 1
    data = WordIndexDataset.default(gpt2_tok, n_prompts=24, seed=5)
    ref = _sets(engine, layer, data, method, monkeypatch, enabled=False)
    assert counted == []
    got = _sets(engine, layer, data, method, monkeypatch, enabled=True)
    assert got.shape == ref.shape  # (read out as float32: a float64 difference shows at most as one rounding)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)
    assert counted and set(counted) == {0, 1}  # from the tokens and from the sets' first layers
    state = lean_route.route_state(engine)
    assert state and all(v is None for v in state.values())
    assert {k[1] for k in state} == {"tokens", "resid"}
    assert not (got[1] == got[0]).all()  # the ablation changed something


def test_a_lean_route_that_disagrees_with_the_bridge_is_not_taken(gpt2_ctx, gpt2_tok, counted, monkeypatch, caplog):
    """The first forward of a depth runs both ways: a lean answer off by more than the tolerance keeps the bridge
    for that model and depth (warned), and the answers stay the bridge's."""
    model = gpt2_ctx[0]
    engine = as_engine(model)
    layer = engine.dims.n_layers - 1
    data = WordIndexDataset.default(gpt2_tok, n_prompts=16, seed=9)
    model.to(torch.float32)  # a new dtype: a new check
    try:
        ref = _sets(engine, layer, data, "zero", monkeypatch, enabled=False)
        forward = LeanBlocks.forward
        monkeypatch.setattr(LeanBlocks, "forward", lambda self, *a, **kw: forward(self, *a, **kw) * 1.01)
        got = _sets(engine, layer, data, "zero", monkeypatch, enabled=True)
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
        reasons = [v for k, v in lean_route.route_state(engine).items() if k[0] == layer + 1]
        assert reasons and all(isinstance(r, str) and "differs from the bridge" in r for r in reasons)
        assert "lean forward of head edits differs" in caplog.text
    finally:
        model.to(torch.float64)


def test_other_edits_stay_on_the_bridge(gpt2_ctx, counted, monkeypatch):
    """Residual-stream edits, a residual given as tokens, runs to the logits and gradients are not the route's, and by
    default neither is the CPU (its numbers stay the bridge's, bit for bit); unedited forwards of head depth are."""
    engine = as_engine(gpt2_ctx[0])
    lean_route._STATE.pop(engine.model, None)  # (no check left from another test)
    x = torch.randn(2, 5, engine.dims.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    keep = lambda act, name: act  # noqa: E731
    assert lean_route.ENABLED == "auto"
    with torch.no_grad():
        assert lean_route.lean_run(engine, x, [], stop_at_layer=2, start_at_layer=1) is None  # (a CPU tensor)
    monkeypatch.setattr(lean_route, "ENABLED", True)
    with torch.no_grad():
        assert lean_route.lean_run(engine, x, [("blocks.1.hook_resid_pre", keep)], stop_at_layer=2,
                                   start_at_layer=1) is None
        assert lean_route.lean_run(engine, x, [], stop_at_layer=2, start_at_layer=None) is None  # (not tokens)
        assert lean_route.lean_run(engine, x, [], stop_at_layer=None, start_at_layer=1) is None
    assert lean_route.lean_run(engine, x, [], stop_at_layer=2, start_at_layer=1) is None  # (gradients on)
    assert counted == []
    with torch.no_grad():  # (as the runner's forwards run)
        got = lean_route.lean_run(engine, x, [("blocks.1.attn.hook_z", keep)], stop_at_layer=2, start_at_layer=1)
    assert got is not None and got[0].shape == x.shape and got[1] == {} and len(counted) == 2  # the check's, then this


@pytest.mark.parametrize("method", ["resample", "mean"])
def test_the_route_runs_only_what_an_ablation_can_change(method, llama_ctx, small_data, counted, monkeypatch):
    """As the bridge's forwards do (test_prefix_reuse): each set starts at its first ablated layer, and resample
    ablation after the prefix every prompt shares, on that prefix's cached keys and values."""
    monkeypatch.setattr(lean_route, "ENABLED", True)
    engine = as_engine(llama_ctx[0])
    prompts = small_data.test
    T = prompts.max_len()
    shared = int((prompts.tokens[:, :T] != prompts.tokens[:1, :T]).any(0).nonzero().min())
    seen = []
    forward = LeanBlocks.forward

    def spy(self, resid, **kw):
        seen.append((int(resid.shape[1]), kw.get("start", 0), kw.get("first", 0), kw.get("past") is not None))
        return forward(self, resid, **kw)

    monkeypatch.setattr(LeanBlocks, "forward", spy)
    means = head_means(engine, small_data.train, [1], length=T) if method == "mean" else None
    n_ref = len(seen)  # the mean-ablation reference: whole prompts from the tokens
    assert (n_ref > 0) == (method == "mean") and all(s[1:] == (0, 0, False) for s in seen)
    ablated_sets(engine, 1, prompts, [[], [(1, 0)], [(1, 2)]], method, means, seed=0)
    # an unpatched run from the tokens (on the route too) keeps the residual every ablated forward starts from
    n_base = next(i for i, s in enumerate(seen[n_ref:]) if s[2] != 0)
    assert n_base > 0 and all(s == (T, 0, 0, False) for s in seen[n_ref:n_ref + n_base])
    seen = seen[n_ref + n_base:]
    assert seen and all(first == 1 for *_, first, _ in seen)
    if method == "resample":
        assert shared >= 1 and all(w == T - shared and start == shared and past for w, start, _, past in seen)
    else:
        assert all(w == T and start == 0 and not past for w, start, _, past in seen)


def test_hooks_on_the_model_send_forwards_to_the_bridge(gpt2_ctx, gpt2_tok, monkeypatch):
    """A TransformerLens persistent hook or a torch forward hook on a block's module would be bypassed by the lean
    blocks: while one is attached, the bridge runs the forwards (and the hook acts on them)."""
    model = gpt2_ctx[0]
    engine = as_engine(model)
    layer = engine.dims.n_layers - 1
    data = WordIndexDataset.default(gpt2_tok, n_prompts=16, seed=2)
    ref = _sets(engine, layer, data, "zero", monkeypatch, enabled=False)
    mlp = model.original_model.transformer.h[0].mlp
    attach = {"persistent TransformerLens hook": lambda: model.add_hook("blocks.0.hook_resid_post",
                                                                         lambda act, hook: act * 1.5),
              "torch forward hook": lambda: mlp.register_forward_hook(lambda m, i, o: o * 0.5)}
    for kind, add in attach.items():
        handle = add()
        try:
            hooked = _sets(engine, layer, data, "zero", monkeypatch, enabled=False)
            got = _sets(engine, layer, data, "zero", monkeypatch, enabled=True)
            torch.testing.assert_close(got, hooked, rtol=0, atol=0, msg=kind)
            assert not torch.allclose(hooked, ref), kind
        finally:
            handle.remove() if handle is not None else model.reset_hooks(including_permanent=True)
    torch.testing.assert_close(_sets(engine, layer, data, "zero", monkeypatch, enabled=True), ref, rtol=1e-6,
                               atol=1e-7)


def test_new_weights_get_new_blocks_and_checks(llama_ctx, monkeypatch):
    """A parameter replaced (not edited in place) after a check: the route sees it, as the bridge does."""
    model = llama_ctx[0]
    engine = as_engine(model)
    monkeypatch.setattr(lean_route, "ENABLED", True)
    x = torch.randn(3, 6, engine.dims.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    norm = model.original_model.model.layers[1].input_layernorm
    old = norm.weight
    with torch.no_grad():
        a = lean_route.lean_run(engine, x, [], stop_at_layer=2, start_at_layer=1)
        norm.weight = torch.nn.Parameter(old.detach() * 2)
        try:
            b = lean_route.lean_run(engine, x, [], stop_at_layer=2, start_at_layer=1)
            ref, _ = engine.run(x, stop_at_layer=2, start_at_layer=1)
        finally:
            norm.weight = old
    assert a is not None and b is not None
    (a, _), (b, _) = a, b
    assert not torch.allclose(a, b)
    torch.testing.assert_close(b, ref, rtol=1e-10, atol=1e-10)


def test_a_forward_the_route_cannot_run_goes_to_the_bridge(gpt2_ctx, monkeypatch):
    """No blocks to run (stop 0), or a failure inside the route: None, and the runner's answer is the bridge's."""
    from wordpos.patching.runner import NOOP, Request, run_interventions

    engine = as_engine(gpt2_ctx[0])
    monkeypatch.setattr(lean_route, "ENABLED", True)
    tokens = torch.randint(0, 100, (3, 6))
    req = Request(tokens=tokens, read=lambda out, cache, P, sl: out, stop_at_layer=0)
    got = run_interventions(engine, req, [NOOP], progress=False)
    monkeypatch.setattr(lean_route, "ENABLED", False)
    torch.testing.assert_close(got, run_interventions(engine, req, [NOOP], progress=False), rtol=0, atol=0)
    monkeypatch.setattr(lean_route, "ENABLED", True)
    monkeypatch.setattr(LeanBlocks, "forward", lambda self, *a, **kw: 1 / 0)
    x = torch.randn(2, 4, engine.dims.d_model, dtype=torch.float64)
    with torch.no_grad():
        assert lean_route.lean_run(engine, x, [], stop_at_layer=2, start_at_layer=1) is None


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_cached_runs_on_the_route_keep_what_the_bridge_keeps(arch, gpt2_ctx, llama_ctx, gpt2_tok, counted,
                                                               monkeypatch):
    """An unpatched run that keeps head outputs and block inputs (the mean-ablation reference, the run ablated
    forwards start from), from tokens and from a cached residual, with and without an edit before the kept head
    outputs: the same activations as the bridge's cache, on the lean blocks; a cache of anything else stays on the
    bridge."""
    from wordpos.patching import runner
    from wordpos.patching.runner import Edit, Intervention, Request, cache_run, run_interventions

    routed = []  # (what the runner's cached requests asked for, whether the lean blocks answered)
    lean_run = runner.lean_run

    def spy(*a, **kw):
        got = lean_run(*a, **kw)
        if kw.get("cache"):
            routed.append((tuple(kw["cache"]), got is not None))
        return got

    monkeypatch.setattr(runner, "lean_run", spy)
    engine = as_engine((gpt2_ctx if arch == "gpt2" else llama_ctx)[0])
    n = engine.dims.n_layers
    data = WordIndexDataset.default(gpt2_tok, n_prompts=12, seed=4)
    tokens = data.test.tokens[:, :data.test.max_len()]
    names = [f"blocks.{L}.attn.hook_z" for L in range(n)] + [f"blocks.{L}.hook_resid_pre" for L in range(n)]
    runs = {}
    for on in (False, True):
        monkeypatch.setattr(lean_route, "ENABLED", on)
        out, cache = cache_run(engine, tokens, names, stop_at_layer=n)
        # the input of the block a run stops at is its output (the bridge's engine keeps it so too)
        cache["edge"] = cache_run(engine, tokens, [f"blocks.{n - 1}.hook_resid_pre"], stop_at_layer=n - 1)[1][
            f"blocks.{n - 1}.hook_resid_pre"]
        # from a cached residual, head 0 of the last layer zeroed before its output is kept
        req = Request(tokens=tokens, read=lambda o, c, P, sl: {k: v.unsqueeze(0) for k, v in c.items()},
                      stop_at_layer=n, resid={1: cache["blocks.1.hook_resid_pre"]},
                      cache=[f"blocks.{n - 1}.attn.hook_z", f"blocks.{n - 1}.hook_resid_pre"])
        edited = run_interventions(engine, req, [Intervention((Edit(f"blocks.{n - 1}.attn.hook_z", "zero", 0),),
                                                              start_layer=1)], progress=False)
        runs[on] = (out, cache, edited)
        # three cached runs, each answered by the lean blocks (a new kind of run is also checked on them first)
        assert [ok for _, ok in routed] == [on] * 3 and ((len(counted) >= 3) if on else not counted)
        routed.clear()
    (o0, c0, e0), (o1, c1, e1) = runs[False], runs[True]
    torch.testing.assert_close(o1, o0, rtol=1e-10, atol=1e-10)
    for k in names + ["edge"]:
        torch.testing.assert_close(c1[k], c0[k], rtol=1e-10, atol=1e-10, msg=k)
    for k in e0:
        torch.testing.assert_close(e1[k], e0[k], rtol=1e-10, atol=1e-10, msg=k)
    assert bool((e1[f"blocks.{n - 1}.attn.hook_z"][0, :, :, 0] == 0).all())  # kept after the edit
    monkeypatch.setattr(lean_route, "ENABLED", True)
    with torch.no_grad():
        for other in ("blocks.0.hook_resid_post", "blocks.0.attn.hook_pattern", f"blocks.{n}.hook_resid_pre"):
            assert lean_route.lean_run(engine, tokens, [], stop_at_layer=n, start_at_layer=None,
                                       cache=[other]) is None, other
