"""cached_runs (the stacked clean/corrupted forward of ``prepare``, with the base run's keys/values) against the
engine's own plain runs and run_prefix, at several chunk sizes, on the tiny GPT-2 and grouped-query Llama."""

from __future__ import annotations

import pytest
import torch

from wordpos.probing import hooks as H
from wordpos.probing.engines import as_engine
from wordpos.probing.engines.split_inputs import cached_runs, run_prefix


@pytest.mark.parametrize("rows", [1, 3, 100])
def test_cached_runs_equal_separate_runs_and_run_prefix(model, rows):
    eng = as_engine(model)
    stop = eng.dims.n_layers
    gen = torch.Generator().manual_seed(4)
    a, b = (torch.randint(0, 500, (n, 11), generator=gen) for n in (4, 5))
    names = [H.resid(0, "resid_pre"), H.attn_z(1), H.mlp_out(stop - 1)]
    outs, caches, kv = cached_runs(eng, [a, b], names, stop, rows, keep=[names, names[:1]], kv_group=1)
    tol = 1e-7 if next(model.parameters()).dtype == torch.float64 else 1e-5
    for g, toks in enumerate((a, b)):
        with torch.no_grad():
            ref_out, ref = eng.run(toks, cache=names, stop_at_layer=stop)
        scale = float(ref_out.abs().max())
        assert (outs[g] - ref_out).abs().max() <= tol * scale
        assert set(caches[g]) == set(names if g == 0 else names[:1])  # only what was asked for is kept
        for n, v in caches[g].items():
            assert v.shape == ref[n].shape and (v - ref[n]).abs().max() <= tol * max(1.0, float(ref[n].abs().max()))
    pre = run_prefix(eng, b, stop, split=False)
    assert kv.rows == 5 and kv.length == 11 and len(kv.keys) == stop
    for L in range(stop):
        for x, y in ((kv.keys[L], pre.keys[L]), (kv.values[L], pre.values[L])):
            assert (x - y).abs().max() <= tol * max(1.0, float(y.abs().max()))
    assert torch.equal(kv.resid, outs[1])
