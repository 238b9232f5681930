"""One experiment, two engines: on the planted model and the organism, residuals, per-head activation patching
and path patching give the same numbers through TransformerLens and nnsight (max abs difference <= 1e-4)."""

import numpy as np
import pytest
import torch

from wordpos.patching import make_pairs, patch_heads, path_patch_direct, path_patch_edges, prepare
from wordpos.probing import WordIndexDataset, WordIndexProbe, collect_residuals, load_model
from wordpos.probing.engines import TLEngine, make_engine


@pytest.fixture(scope="module", params=["planted", "organism"])
def engines(request, tmp_path_factory):
    import os

    os.environ.setdefault("WORDPOS_CACHE", str(tmp_path_factory.mktemp("cache")))
    tl = TLEngine(load_model(request.param, device="cpu"))
    return tl, make_engine(tl.model, "nnsight")


def test_residuals_patching_and_path_patching_agree(engines):
    tl, nn = engines
    data = WordIndexDataset.default(tl.tokenizer, n_prompts=120, seed=0)
    a_tl = collect_residuals(tl, data, progress=False)
    a_nn = collect_residuals(nn, data, progress=False)
    for L in a_tl.layers:
        assert (a_tl.test(L) - a_nn.test(L)).abs().max() <= 1e-4
    layer = 1
    probe = WordIndexProbe(layer=layer, model=tl.name).fit(a_tl.train(layer), a_tl.labels["train"])
    pairs = make_pairs(tl.tokenizer, 4, vocab=data.vocab, seed=0)
    c_tl, c_nn = prepare(tl, pairs, probe), prepare(nn, pairs, probe)
    for fn in (lambda e, c: patch_heads(e, c, progress=False),
               lambda e, c: patch_heads(e, c, by_pos=True, progress=False),
               lambda e, c: path_patch_direct(e, c, progress=False),
               lambda e, c: path_patch_edges(e, c, progress=False)):
        x, y = fn(tl, c_tl).effects, fn(nn, c_nn).effects
        assert np.array_equal(np.isnan(x), np.isnan(y))
        assert np.nanmax(np.abs(x - y)) <= 1e-4
    assert torch.isfinite(torch.tensor(c_tl.metric.clean_value))
    # resample ablation: both skip the shared prefix, each on its own engine's cached keys/values
    from wordpos.patching.ablation import ablated_sets

    sets = [[], [(0, 2)], [(1, 1), (1, 0)], [(1, 3)]]  # the planted circuit (0.2, 1.1) and the organism's (1.0, 1.3)
    x = ablated_sets(tl, 1, data.test, sets, "resample", seed=1)
    y = ablated_sets(nn, 1, data.test, sets, "resample", seed=1)
    assert (x[1:] - x[0]).abs().max() > 1e-3 and (x - y).abs().max() <= 1e-4
