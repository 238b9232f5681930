"""Attribution first, exact where it matters: the screened activation sweep measures the attribution-ranked
candidates plus a random audit exactly (values equal to the full exact sweep), reports attribution's rank correlation
on them, and falls back to every head when that correlation is below the threshold."""

import numpy as np
import pytest
from scipy.stats import spearmanr

from wordpos.patching import attribute_heads, patch_heads
from wordpos.patching.experiment import PatchConfig
from wordpos.patching.methods import screened_heads
from wordpos.patching.registry import StageInputs
from wordpos.patching.sizing import Sizing
from wordpos.probing import as_engine
from wordpos.probing.models.planted import PLANTED


def _screen(planted_model, planted_probe, planted_data, planted_ctx, **cfg):
    eng = as_engine(planted_model)
    config = PatchConfig(model=eng.name, method="activation", screen="attribution", n_pairs=len(planted_ctx.pairs),
                         sizing=Sizing(candidates=2, audit=3), **cfg)
    return screened_heads(StageInputs(eng, planted_probe, config, planted_data.vocab, progress=False), planted_ctx,
                          None, progress=False)


@pytest.fixture(scope="module")
def full_sweep(planted_model, planted_ctx):
    return patch_heads(planted_model, planted_ctx, progress=False).head_effects()


def test_screen_measures_candidates_and_audit_exactly(planted_model, planted_probe, planted_data, planted_ctx,
                                                      full_sweep):
    res, info = _screen(planted_model, planted_probe, planted_data, planted_ctx, screen_min_rho=-1.0)
    s = info["screen"]
    e = res.head_effects()
    measured = np.isfinite(e)
    assert measured.sum() == 5 and not s["fallback"] and s["measured"] == 5
    assert s["candidates"][0] == "{}.{}".format(*PLANTED.counter)  # attribution ranks the counter first
    assert set(s["candidates"]).isdisjoint(s["audit"])
    np.testing.assert_allclose(e[measured], full_sweep[measured], atol=1e-6)  # the same numbers as the full sweep
    att = attribute_heads(planted_model, planted_ctx).head_effects()
    assert s["rank_correlation"] == pytest.approx(spearmanr(att[measured], full_sweep[measured]).statistic)
    np.testing.assert_allclose(res.extra["attribution"], att)


def test_screen_falls_back_to_every_head_when_attribution_ranks_badly(planted_model, planted_probe, planted_data,
                                                                     planted_ctx, full_sweep):
    res, info = _screen(planted_model, planted_probe, planted_data, planted_ctx, screen_min_rho=1.01)
    assert info["screen"]["fallback"] and info["screen"]["measured"] == "all"
    np.testing.assert_allclose(res.head_effects(), full_sweep, atol=1e-6)
