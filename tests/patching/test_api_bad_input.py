"""Bad input to the Python API, found by an audit of the notebook entry points: each is refused with a wordpos
error naming the argument and the fix, before any long work, instead of a silent wrong answer or a deep traceback."""

import numpy as np
import pytest
import torch

from wordpos.probing import ConfigError, WordIndexProbe


@pytest.fixture(scope="module")
def xy():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(120, 8, generator=g, dtype=torch.float64)
    y = (X[:, :3].argmax(1)).numpy()
    return X.numpy(), y


@pytest.mark.parametrize("solver", ["torch", "sklearn"])
@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_probe_fit_refuses_nonfinite_residuals(xy, solver, bad):
    X, y = xy
    X = X.copy()
    X[3, 2] = float(bad)
    with pytest.raises(ConfigError, match="NaN or inf"):
        WordIndexProbe(solver=solver).fit(X, y)


@pytest.mark.parametrize("solver", ["torch", "sklearn"])
@pytest.mark.parametrize("params,says", [({"C": -1.0}, "C \\(the inverse"), ({"C": 0}, "positive number"),
                                         ({"max_iter": 0}, "max_iter must be a positive")])
def test_probe_fit_refuses_settings_that_fit_nothing(xy, solver, params, says):
    with pytest.raises(ConfigError, match=says):
        WordIndexProbe(solver=solver, **params).fit(*xy)


@pytest.mark.parametrize("solver", ["torch", "sklearn"])
def test_probe_fit_refuses_labels_that_are_not_word_indices(xy, solver):
    X, y = xy
    with pytest.raises(ConfigError, match="integer word indices"):
        WordIndexProbe(solver=solver).fit(X, y + 0.5)
    with pytest.raises(ConfigError, match=r"one word index per sample"):
        WordIndexProbe(solver=solver).fit(X, np.stack([y, y], 1))
    # whole numbers in a float array are word indices: the same fit as the int labels
    a = WordIndexProbe(solver=solver).fit(X, y.astype(float)).predict(X)
    assert (a == WordIndexProbe(solver=solver).fit(X, y).predict(X)).all()


def test_a_context_is_not_used_with_another_model(tiny_model, tiny_ctx, planted_model):
    from wordpos.patching import patch_heads
    from wordpos.patching.eap import score_edges
    from wordpos.probing import as_engine

    with pytest.raises(ConfigError, match="not the one this patching context was prepared on"):
        patch_heads(planted_model, tiny_ctx)
    with pytest.raises(ConfigError, match="not the one this patching context was prepared on"):
        score_edges(planted_model, tiny_ctx, method="eap")
    # the model it was prepared on, as a bridge or as an engine, is fine
    a = patch_heads(tiny_model, tiny_ctx, heads="0.1,1.0").effects
    b = patch_heads(as_engine(tiny_model), tiny_ctx, heads=[(0, 1), (1, 0)]).effects
    assert np.allclose(a, b, equal_nan=True)


def test_ablation_refuses_data_with_word_indices_the_probe_never_saw(tiny_model, tiny_probe, gpt2_tok):
    from wordpos.patching import ablate_heads
    from wordpos.probing import WordIndexDataset

    data = WordIndexDataset.default(gpt2_tok, n_prompts=40, seed=0, n_words=9)
    with pytest.raises(ConfigError, match=r"word indices \[7, 8\] that the probe was not fitted on"):
        ablate_heads(tiny_model, tiny_probe, data, "0.1", refit=False, progress=False)


@pytest.mark.parametrize("heads", [[1, 0], [(1.5, 0)], [("a", 0)], [(1,)], "1.x", "a1.x", "a1.h2.q", [{"head": "1.2"}],
                                   "a1.h2<k>", "a1.h2<q>"])
def test_malformed_head_lists_are_named(heads):
    from wordpos.patching.ablation import parse_heads

    with pytest.raises(ConfigError, match="is not LAYER.HEAD"):
        parse_heads(heads)


def test_one_head_as_a_pair_and_negative_random_sets(tiny_model, tiny_probe, small_data):
    from wordpos.patching import ablate_heads
    from wordpos.patching.ablation import parse_heads

    assert parse_heads((1, 0)) == [(1, 0)] and parse_heads("1.0, 0.2") == [(0, 2), (1, 0)]
    with pytest.raises(ConfigError, match="n_random must be a non-negative integer"):
        ablate_heads(tiny_model, tiny_probe, small_data, (1, 0), n_random=-1, refit=False, progress=False)


def test_string_heads_reach_path_patching_and_evidence(tiny_model, tiny_ctx, small_data):
    from wordpos.patching import path_patch_edges
    from wordpos.patching.roles import anchor_evidence

    res = path_patch_edges(tiny_model, tiny_ctx, receivers="1.0", senders="0.0,0.1")
    ref = path_patch_edges(tiny_model, tiny_ctx, receivers=[(1, 0)], senders=[(0, 0), (0, 1)])
    assert np.allclose(res.effects, ref.effects, equal_nan=True)
    assert set(anchor_evidence(tiny_model, small_data.test, "0.1")) == {"0.1"}


def test_interval_levels_are_checked_before_the_search(planted_model, planted_ctx):
    from wordpos.circuit.edge_circuit import select_circuit
    from wordpos.circuit.evaluation import faithfulness_curve

    with pytest.raises(ConfigError, match="alpha is the intervals' miss rate"):
        select_circuit(planted_model, planted_ctx, None, alpha=5)
    with pytest.raises(ConfigError, match="n_boot"):
        select_circuit(planted_model, planted_ctx, None, n_boot=0)
    with pytest.raises(ConfigError, match="alpha is the intervals' miss rate"):
        faithfulness_curve(planted_model, planted_ctx, None, alpha=2.0)


def test_make_pairs_checks_its_recipe_before_building_pairs(gpt2_tok, small_data, monkeypatch):
    from wordpos.patching import make_pairs

    drawn = []
    vocab = small_data.vocab
    split = type(vocab).split
    monkeypatch.setattr(type(vocab), "split", lambda self, *a, **k: drawn.append(1) or split(self, *a, **k))
    with pytest.raises(ConfigError, match="kind must be 'split' or 'merge'"):
        make_pairs(gpt2_tok, 20000, vocab=vocab, kind="swap")
    assert not drawn  # refused before any word was drawn for the 20,000 pairs
    with pytest.raises(ConfigError, match="n_words must be at least 4"):
        make_pairs(gpt2_tok, 4, vocab=small_data.vocab, n_words=3)


def test_head_indices_in_any_integer_form_parse_and_fractions_do_not():
    from wordpos.patching.ablation import parse_heads

    assert parse_heads(torch.tensor([[1, 0], [0, 2]])) == [(0, 2), (1, 0)]  # e.g. torch.nonzero of a head mask
    assert parse_heads(np.array([[1, 0]])) == parse_heads([(1.0, 0.0)]) == parse_heads((np.int64(1), 0)) == [(1, 0)]
    with pytest.raises(ConfigError, match="is not LAYER.HEAD"):
        parse_heads([(1.5, 0)])


def test_probe_labels_as_a_column_are_one_label_per_sample(xy):
    X, y = xy
    a = WordIndexProbe(solver="torch").fit(X, y[:, None]).predict(X)
    assert (a == WordIndexProbe(solver="torch").fit(X, y).predict(X)).all()


def test_wrong_objects_in_the_notebook_calls_are_named(tiny_model, tiny_probe, tiny_pairs, tiny_ctx, small_data):
    """The objects the README's calls take, swapped or given as names, are refused with what to pass."""
    from wordpos.circuit.edge_circuit import select_circuit
    from wordpos.circuit.evaluation import faithfulness_curve
    from wordpos.patching import ablate_heads, make_pairs, prepare
    from wordpos.patching.eap import score_edges
    from wordpos.probing import WordIndexDataset

    cases = [
        (lambda: prepare(tiny_model, small_data, tiny_probe), "pairs must be PatchingPairs"),
        (lambda: prepare(tiny_model, tiny_pairs, small_data), "probe must be a fitted WordIndexProbe"),
        (lambda: score_edges(tiny_model, tiny_pairs, method="eap"), "ctx must be a PatchContext"),
        (lambda: faithfulness_curve(tiny_model, tiny_ctx, torch.zeros(3, 3)), "scores must be the EdgeScores"),
        (lambda: select_circuit(tiny_model, tiny_ctx, torch.zeros(3, 3)), "scores must be the EdgeScores"),
        (lambda: make_pairs(tiny_model, 4), "expected the model's tokenizer"),
        (lambda: make_pairs("organism", 4), "expected the model's tokenizer"),
        (lambda: WordIndexDataset.default("organism", n_prompts=20), "expected the model's tokenizer"),
        (lambda: ablate_heads(tiny_model, tiny_probe, tiny_pairs, "0.1", progress=False), "data must be a "
                                                                                           "WordIndexDataset"),
    ]
    for call, says in cases:
        with pytest.raises(ConfigError, match=says):
            call()


def test_residual_sites_and_role_layers_are_checked_first(tiny_model, small_data):
    from wordpos.patching.roles import head_roles
    from wordpos.probing import collect_residuals

    with pytest.raises(ConfigError, match="kind must be 'resid_pre', 'resid_mid' or 'resid_post'"):
        collect_residuals(tiny_model, small_data, layers=[1], kind="resid_foo", progress=False)
    for bad in ([-1], [7]):
        with pytest.raises(ConfigError, match="out of range"):
            head_roles(tiny_model, small_data.test, layers=bad)


def test_a_probe_without_its_model_is_used_with_a_warning(tiny_model, tiny_probe, tiny_pairs):
    """A probe fitted without ``model=`` cannot be checked against the model it is used on (one of another model
    of the same width would pass): ``prepare`` says so and how to record it, and goes on; one that records it is
    used without a word."""
    import copy
    import warnings

    from wordpos.patching import prepare

    anonymous = copy.deepcopy(tiny_probe)
    anonymous.model = None
    with pytest.warns(UserWarning, match=r"does not record the model.*WordIndexProbe\(model=acts.model_name"):
        prepare(tiny_model, tiny_pairs, anonymous)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepare(tiny_model, tiny_pairs, tiny_probe)


def test_heads_from_one_call_parse_as_the_heads_they_name():
    """top_heads()' dicts (one or a list), the circuit's node dicts and its head names are the same heads as their
    "L.H" string; a reader's name is refused: under grouped-query attention "a1.h2<k>" is key/value head 2 of
    layer 1, whose query heads are others (the edge graph's own reading, checked here)."""
    from wordpos.patching.ablation import parse_heads
    from wordpos.patching.edge_graph import EdgeGraph

    top = [{"head": "3.4", "layer": 3, "index": np.int64(4), "effect": 0.5}, {"head": "2.1", "layer": 2, "index": 1}]
    assert parse_heads(top) == parse_heads(top[::-1]) == parse_heads("3.4,2.1") == [(2, 1), (3, 4)]
    assert parse_heads(top, keep_order=True) == [(3, 4), (2, 1)] and parse_heads(top[0]) == [(3, 4)]
    assert parse_heads([{"name": "a3.h4", "layer": 3, "head": 4, "inputs": ["k"]}]) == [(3, 4)]
    assert parse_heads("a3.h4, a2.h1") == [(2, 1), (3, 4)]
    assert EdgeGraph.build(2, 9, 3, 1).reader_heads("a1.h2<k>") == ["a1.h6", "a1.h7", "a1.h8"]


def test_the_fit_of_all_layers_refuses_a_model_object_too(tiny_model, small_data):
    """sweep_layers' batched torch fit builds its probes without fit(): the same check runs there, before any
    layer is fitted (the object would otherwise be stored as the probes' model and fail when saved)."""
    from wordpos.probing import collect_residuals, sweep_layers

    acts = collect_residuals(tiny_model, small_data, layers=[0, 1], progress=False)
    with pytest.raises(ConfigError, match="model= names the model"):
        sweep_layers(acts, model=tiny_model, shuffled_control="none", progress=False)
