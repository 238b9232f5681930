"""Every method, on the planted model: the counter ranks first, distractors below it, and path patching
finds the planted two-step edge counter → receiver (via v)."""

import numpy as np
import pytest

from wordpos.patching import ablation_sweep, attribute_heads, head_roles, patch_heads, path_patch_direct, path_patch_edges
from wordpos.probing.models.planted import PLANTED

COUNTER = PLANTED.counter
DISTRACTORS = list(PLANTED.distractors.values())


def _rank(effects: np.ndarray) -> list[tuple[int, int]]:
    order = np.argsort(-np.abs(effects), axis=None)
    return [tuple(int(i) for i in np.unravel_index(k, effects.shape)) for k in order]


@pytest.mark.parametrize("method", ["activation", "attribution", "path"])
def test_counter_ranks_first_and_distractors_below(planted_model, planted_ctx, method):
    fn = {"activation": lambda: patch_heads(planted_model, planted_ctx, progress=False),
          "attribution": lambda: attribute_heads(planted_model, planted_ctx),
          "path": lambda: path_patch_direct(planted_model, planted_ctx, progress=False)}[method]
    e = fn().effects
    ranked = _rank(e)
    if method == "path":  # direct paths: the counter and its receiver each carry half
        assert set(ranked[:2]) == {COUNTER, PLANTED.receivers[0]}
    else:
        assert ranked[0] == COUNTER
    for d in DISTRACTORS:
        assert abs(e[d]) < 0.05 * abs(e[COUNTER])


def test_ablation_ranks_the_counter_among_the_top(planted_model, planted_probe, planted_data):
    acc = ablation_sweep(planted_model, planted_probe, planted_data, method="resample", progress=False)
    clean = acc.max()
    drops = clean - acc
    assert COUNTER in _rank(drops)[:2]
    for d in DISTRACTORS:
        assert drops[d] < 0.5 * drops[COUNTER]


def test_path_patching_finds_the_planted_edge(planted_model, planted_ctx):
    res = path_patch_edges(planted_model, planted_ctx, progress=False)
    e = np.nan_to_num(res.effects)
    (rL, rH), via = PLANTED.receivers[0], res.coords["via"].index("v")
    edge = e[COUNTER[0], COUNTER[1], rL, rH, via]
    assert edge > 0.3
    e[COUNTER[0], COUNTER[1], rL, rH, via] = 0
    assert np.abs(e).max() < 0.05 * edge  # nothing else


def test_roles_single_out_the_counter(planted_model, planted_data):
    roles = head_roles(planted_model, planted_data.test)
    assert _rank(roles.scores["counter_score"])[0] == COUNTER
    assert roles.scores["counter_score"][COUNTER] > 0.95
    assert _rank(roles.scores["to_prev"])[0] == PLANTED.distractors["prev_token"]
    assert roles.label(*COUNTER) == "anchor counter"
