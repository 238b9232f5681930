import numpy as np
import pytest
import torch

from wordpos.patching import ablate_heads, head_roles, parse_heads
from wordpos.patching.ablation import ablated_predictions, head_means
from wordpos.patching.roles import ideal_counter_pattern
from wordpos.patching.corruptions import derangement
from wordpos.probing import ConfigError, as_engine, collect_residuals, hooks


def test_no_ablation_reproduces_the_probe_accuracy(tiny_model, tiny_probe, small_data):
    engine = as_engine(tiny_model)
    pred = ablated_predictions(engine, tiny_probe, small_data.test, [], "zero")
    acts = collect_residuals(tiny_model, small_data, layers=[1], splits=("test",), progress=False)
    assert np.array_equal(pred, tiny_probe.predict(acts.test(1)))


def test_mean_ablation_uses_position_wise_means(tiny_model, small_data):
    engine = as_engine(tiny_model)
    means = head_means(engine, small_data.train, [0])
    with torch.no_grad():
        _, cache = tiny_model.run_with_cache(small_data.train.tokens[:, :small_data.train.max_len()])
    z = cache["blocks.0.attn.hook_z"]
    # position 5 is inside the prefix for every prompt, so its mean is the plain mean
    assert torch.allclose(means[0][5], z[:, 5].mean(0), atol=1e-5)


def _reference_predictions(model, probe, data, heads, method, seed=0):
    """Probe predictions on the test split with ``heads`` ablated, by plain TransformerLens hook runs."""
    test, train = data.test, data.train
    T = test.max_len()
    toks = test.tokens[:, :T]
    layers = sorted({L for L, _ in heads})
    with torch.no_grad():
        if method == "mean":
            Ttr = train.max_len()
            _, c = model.run_with_cache(train.tokens[:, :Ttr])
            mask = (torch.arange(Ttr)[None, :] < train.lengths[:, None]).float()
            ref = {L: (c[hooks.attn_z(L)] * mask[:, :, None, None]).sum(0) / mask.sum(0)[:, None, None] for L in layers}
        elif method == "resample":
            perm = derangement(len(test), seed)
            _, c = model.run_with_cache(toks[perm])
            ref = {L: c[hooks.attn_z(L)] for L in layers}

        def ablate(act, hook):
            L = int(hook.name.split(".")[1])
            act = act.clone()
            for hL, h in heads:
                if hL == L:
                    act[:, :, h] = 0.0 if method == "zero" else (ref[L][:T, h] if method == "mean" else ref[L][:, :, h])
            return act

        holder = {}
        model.run_with_hooks(toks, fwd_hooks=[(hooks.attn_z(L), ablate) for L in layers] + [
            (hooks.resid(int(probe.layer)), lambda a, hook: holder.setdefault("r", a))])
    prompt, pos = test.positions("word_final")
    return probe.predict(holder["r"][prompt, pos].numpy())


@pytest.mark.parametrize("method", ["zero", "mean", "resample"])
def test_ablate_heads_matches_hook_runs_and_controls_avoid_the_heads(tiny_model, tiny_probe, small_data, method):
    res = ablate_heads(tiny_model, tiny_probe, small_data, "0.1,1.2", method=method, n_random=3, refit=False,
                       progress=False)
    assert res.heads == [(0, 1), (1, 2)]
    y = small_data.test.labels.numpy()
    expected = _reference_predictions(tiny_model, tiny_probe, small_data, [(0, 1), (1, 2)], method)
    assert res.accuracy == pytest.approx(float(np.mean(expected == y)), abs=1e-9)
    assert res.clean_accuracy == pytest.approx(float(np.mean(tiny_probe.predict(
        _clean_resid(tiny_model, small_data.test)) == y)), abs=1e-9)
    assert len(res.random_accuracies) == 3 and all(len(h) == 2 for h in res.random_heads)
    for pick, acc in zip(res.random_heads, res.random_accuracies):
        assert not set(pick) & {(0, 1), (1, 2)}  # a control never ablates a head under test
        assert {L for L, _ in pick} <= {0, 1}
        ref = _reference_predictions(tiny_model, tiny_probe, small_data, pick, method)
        assert acc == pytest.approx(float(np.mean(ref == y)), abs=1e-9)
    assert res.to_dict()["drop"] == pytest.approx(res.clean_accuracy - res.accuracy)


def _clean_resid(model, prompts):
    with torch.no_grad():
        _, c = model.run_with_cache(prompts.tokens[:, :prompts.max_len()])
    prompt, pos = prompts.positions("word_final")
    return c[hooks.resid(1)][prompt, pos].numpy()


def test_a_control_with_one_possible_set_says_so(tiny_model, tiny_probe, small_data):
    """Layer 1 of the 4-head model holds exactly one pair besides 1.0 and 1.3: every draw is that pair, and the
    result and the run's printed line say the control has one distinct set (its spread is not a spread over sets)."""
    from wordpos.circuit.commands import _distinct_note

    res = ablate_heads(tiny_model, tiny_probe, small_data, "1.0,1.3", method="zero", n_random=4, refit=False,
                       progress=False)
    assert res.random_heads == [[(1, 1), (1, 2)]] * 4
    d = res.to_dict()
    assert d["random_distinct_sets"] == 1 and d["random_std"] == 0
    assert _distinct_note(d) == " (4 draws, 1 distinct set)"
    wide = ablate_heads(tiny_model, tiny_probe, small_data, "0.1,1.2", method="zero", n_random=3, refit=False,
                        progress=False).to_dict()
    pairs = []  # the distinct draws, by a plain loop
    for s in wide["random_heads"]:
        if sorted(s) not in pairs:
            pairs.append(sorted(s))
    assert wide["random_distinct_sets"] == len(pairs)
    assert _distinct_note(wide) == ("" if len(pairs) == 3 else f" (3 draws, {len(pairs)} distinct sets)")


def test_random_head_sets_exclude_the_heads_under_test():
    from wordpos.patching.ablation import random_head_sets

    heads = [(0, 2), (0, 3)]
    sets = random_head_sets(heads, 200, n_heads=4, max_layer=1, seed=0)
    assert all(len(s) == 2 and not set(s) & set(heads) and {L for L, _ in s} == {0} for s in sets)
    assert {tuple(s) for s in sets} == {((0, 0), (0, 1))}  # layer 0 holds exactly two other heads
    wide = random_head_sets([(0, 0), (0, 1), (0, 2)], 50, n_heads=4, max_layer=1, seed=1)  # one other head in layer 0
    assert all(not set(s) & {(0, 0), (0, 1), (0, 2)} for s in wide)
    assert any(L == 1 for s in wide for L, _ in s)
    with pytest.raises(ConfigError, match="random control needs"):
        random_head_sets([(L, h) for L in range(2) for h in range(3)], 1, n_heads=4, max_layer=1)


def test_ablation_sweep_of_resample_last_batch_of_one(tiny_model, tiny_probe, small_data):
    """A prompt batch of one still gets another prompt's activation: the derangement is over the whole split."""
    from wordpos.patching.ablation import ablated_predictions
    from wordpos.patching.sizing import Sizing

    engine = as_engine(tiny_model)
    n = len(small_data.test)
    batch = n - 1  # the last batch holds one prompt
    got = ablated_predictions(engine, tiny_probe, small_data.test, [(0, 1), (1, 2)], "resample", batch_size=batch)
    expected = _reference_predictions(tiny_model, tiny_probe, small_data, [(0, 1), (1, 2)], "resample")
    assert np.array_equal(got, expected)
    assert Sizing().prompt_batch != batch


def test_ablation_bad_input(tiny_model, tiny_probe, small_data):
    with pytest.raises(ConfigError, match="empty"):
        parse_heads("")
    with pytest.raises(ConfigError, match="LAYER.HEAD"):
        parse_heads("3-4")
    with pytest.raises(ConfigError, match="out of range"):
        ablate_heads(tiny_model, tiny_probe, small_data, "0.9", progress=False)
    with pytest.raises(ConfigError, match="method"):
        ablate_heads(tiny_model, tiny_probe, small_data, "0.1", method="boil", progress=False)


def test_ideal_counter_pattern_by_hand():
    # tokens: BOS, word, anchor, word, cont, word → from the last token: e^3 on the anchor, e^1 on each word start
    is_anchor = torch.tensor([[False, False, True, False, False, False]])
    is_space = torch.tensor([[False, True, False, True, False, True]])
    pat = ideal_counter_pattern(is_anchor, is_space)
    e3, e1 = np.exp(3), np.exp(1)
    expected = torch.tensor([0, e1, e3, e1, 0, e1]) / (e3 + 3 * e1)
    assert torch.allclose(pat[0, 5], expected.float(), atol=1e-6)
    assert torch.allclose(pat[0, 0], torch.tensor([1.0, 0, 0, 0, 0, 0]))


def test_head_roles_equal_a_hand_average_of_the_patterns(tiny_model, small_data):
    """to_prev and to_bos by a plain loop over word-token queries of TL attention patterns."""
    prompts = small_data.test.subset(range(40))
    roles = head_roles(tiny_model, prompts, batch_size=16)
    T = prompts.max_len()
    with torch.no_grad():
        _, c = tiny_model.run_with_cache(prompts.tokens[:, :T])
    for L in range(2):
        pat = c[hooks.attn_pattern(L)]  # [b, head, q, k]
        prev, bos, n = torch.zeros(4), torch.zeros(4), 0
        for i in range(len(prompts)):
            for q in range(1, T):
                if prompts.word_index[i, q] >= 0:
                    prev += pat[i, :, q, q - 1]
                    bos += pat[i, :, q, 0]
                    n += 1
        assert np.allclose(roles.scores["to_prev"][L], (prev / n).numpy(), atol=1e-5)
        assert np.allclose(roles.scores["to_bos"][L], (bos / n).numpy(), atol=1e-5)
    r = roles.head(0, 0)
    best = max(("to_anchor", "to_space", "to_prev", "to_bos"), key=lambda k: r[k])
    expected = {"to_anchor": "anchor", "to_space": "word starts", "to_prev": "previous token", "to_bos": "BOS"}[best]
    assert roles.label(0, 0) == ("anchor counter" if r["counter_score"] > 0.8 else expected)


def test_anchor_evidence_recovers_the_planted_counter(planted_model, planted_data):
    """The planted counter scores exactly 3 on anchors and 1 on word starts (-20 elsewhere): the evidence
    must read a score difference of 2 and no attention elsewhere; the previous-token distractor must not."""
    from wordpos.patching.roles import EVIDENCE_KEYS, anchor_evidence

    ev = anchor_evidence(planted_model, planted_data.test, [(0, 2), (0, 0)], max_prompts=32)
    counter, prev = ev["0.2"], ev["0.0"]
    assert set(counter) == set(EVIDENCE_KEYS)
    assert counter["anchor_vs_space_logit"] == pytest.approx(2.0, abs=1e-3)
    assert counter["to_other"] == pytest.approx(0.0, abs=1e-4) and counter["to_bos"] < 1e-4
    assert counter["counter_score"] > 0.999
    # the reference prefix holds one of each anchor, so each kind gets the same mass
    assert counter["to_period"] == pytest.approx(counter["to_comma"], abs=1e-6)
    assert counter["to_newline"] == pytest.approx(counter["to_comma"], abs=1e-6)
    parts = sum(counter[k] for k in ("to_period", "to_comma", "to_newline", "to_space", "to_bos", "to_other"))
    assert parts == pytest.approx(1.0, abs=1e-5)
    assert prev["counter_score"] < 0.5 and abs(prev["anchor_vs_space_logit"] - 2.0) > 1.0


def test_anchor_evidence_and_patterns_bad_head(planted_model, planted_data):
    from wordpos.patching.roles import anchor_evidence, head_patterns

    with pytest.raises(ConfigError, match="out of range"):
        anchor_evidence(planted_model, planted_data.test, [(0, 7)])
    pats, tokens = head_patterns(planted_model, planted_data.test, [(0, 2), (1, 1)])
    T = int(planted_data.test.lengths[0])
    assert set(pats) == {"0.2", "1.1"} and len(tokens) == T
    assert pats["0.2"].shape == (T, T) and np.allclose(pats["0.2"].sum(-1), 1.0, atol=1e-5)
    assert np.allclose(np.triu(pats["1.1"], 1), 0.0)  # causal


def test_ablation_curve_on_the_planted_counter(planted_model, planted_data, planted_probe):
    """Ablating the planted counter (top of the ranking) must take the re-fitted probe most of the way to the
    position baseline; random heads of layer 0 must not."""
    from wordpos.patching.ablation import ablation_curve

    rows = ablation_curve(planted_model, planted_probe, planted_data, ["0.2", "1.1"], [1, 2], method="zero",
                          n_random=2, progress=False)
    assert [r["k"] for r in rows] == [1, 2] and rows[0]["heads"] == ["0.2"] and rows[1]["heads"] == ["0.2", "1.1"]
    one = rows[0]
    gain = one["clean_accuracy"] - one["baseline_abs_pos_accuracy"]
    assert one["refit_accuracy"] - one["baseline_abs_pos_accuracy"] < 0.5 * gain
    assert one["random_refit_mean"] > one["refit_accuracy"] + 0.2
    with pytest.raises(ConfigError, match="ks must lie"):
        ablation_curve(planted_model, planted_probe, planted_data, ["0.2"], [2], progress=False)


def test_refits_of_identical_ablated_sets_are_fitted_once_with_the_same_accuracies(monkeypatch):
    """Random head sets that change nothing leave identical activations; their refits are fitted once, and every
    set's accuracy equals a probe fitted on that set alone."""
    import torch

    import wordpos.probing.probe as probe_mod
    from wordpos.patching.ablation import _refit_sets
    from wordpos.probing import WordIndexProbe

    g = torch.Generator().manual_seed(0)
    W = torch.randn(8, 4, generator=g)
    sets = [torch.randn(300, 8, generator=g) for _ in range(3)]
    labels = [(x @ W).argmax(-1) for x in sets]
    y = labels[0]
    order = [0, 1, 0, 2, 1, 0]  # six sets, three distinct
    xtr = torch.stack([sets[i][:200] for i in order])
    xte = torch.stack([sets[i][200:] for i in order])
    ytr, yte = y[:200], y[200:]
    ref_probe = WordIndexProbe(layer=0, solver="torch").fit(sets[0][:200], ytr)
    calls = []
    real = probe_mod.fit_probes
    monkeypatch.setattr(probe_mod, "fit_probes", lambda X, *a, **k: calls.append(len(X)) or real(X, *a, **k))
    got = _refit_sets(ref_probe, xtr, ytr, xte, yte, torch.device("cpu"))
    assert sum(calls) == 3
    expect = [WordIndexProbe(layer=0, solver="torch").fit(sets[i][:200], ytr).score(sets[i][200:], yte) for i in order]
    assert got == pytest.approx(expect, abs=1e-12)
    assert len(set(np.round(expect, 6))) > 1  # the distinct sets really differ


@pytest.mark.parametrize("method", ["mean", "resample"])
def test_ablate_heads_reuses_given_means_and_the_shared_prefix(tiny_model, tiny_probe, small_data, method,
                                                               monkeypatch):
    """As the ablation stage calls it: the stage's reference means and a memo shared across calls give the same
    result as computing them afresh, with no second mean run and one run of the shared prefix for every call;
    means that miss a layer or positions are refused with what to pass."""
    from wordpos.patching import ablation
    from wordpos.probing.engines import split_inputs

    engine = as_engine(tiny_model)
    kw = dict(method=method, n_random=2, refit=True, progress=False, seed=1)
    fresh = ablate_heads(engine, tiny_probe, small_data, "0.1,1.2", **kw).to_dict()
    length = max(small_data.test.max_len(), small_data.train.max_len())
    means = ablation.head_means(engine, small_data.train, [0, 1], length=length) if method == "mean" else None
    calls = {"means": 0, "prefix": 0}
    head_means, run_prefix = ablation.head_means, split_inputs.run_prefix
    monkeypatch.setattr(ablation, "head_means", lambda *a, **k: calls.__setitem__("means", calls["means"] + 1)
                        or head_means(*a, **k))
    monkeypatch.setattr(split_inputs, "run_prefix", lambda *a, **k: calls.__setitem__("prefix", calls["prefix"] + 1)
                        or run_prefix(*a, **k))
    memo: dict = {}
    reused = ablate_heads(engine, tiny_probe, small_data, "0.1,1.2", means=means, memo=memo, **kw).to_dict()
    again = ablate_heads(engine, tiny_probe, small_data, "0.1,1.2", means=means, memo=memo, **kw).to_dict()
    for d in (reused, again):
        for k in ("accuracy", "clean_accuracy", "random_accuracies", "refit_accuracy", "random_refit_accuracies"):
            assert d[k] == fresh[k], k
    assert calls == {"means": 0, "prefix": 1 if method == "resample" else 0}
    if method == "mean":
        with pytest.raises(ConfigError, match="means= must hold every layer 0..1"):
            ablate_heads(engine, tiny_probe, small_data, "0.1", means={0: means[0]}, **kw)
        with pytest.raises(ConfigError, match="positions"):
            ablate_heads(engine, tiny_probe, small_data, "0.1", means={L: m[:3] for L, m in means.items()}, **kw)
