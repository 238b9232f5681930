"""The edge runner's lean forward in half precision on the CPU (the GPU's usual dtypes), against the bridge's
split-input hooks in the same dtype and against the float64 answer: the device parity's edge case
(scripts/device_parity.py) where every machine can run it, through the lean blocks' half-precision paths (the norm
rounding before its weight, the in-place RoPE, the additive mask in the model's dtype) and the gradient pass."""

from __future__ import annotations

import pytest
import torch

from wordpos.patching import prepare
from wordpos.patching.eap import score_edges
from wordpos.patching.edge_runner import EdgeRunner


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lean_forward_in_half_precision_matches_the_hooks(tiny_llama_ctx, tiny_pairs, dtype):
    model, ctx = tiny_llama_ctx(5, n_layers=3)
    g = EdgeRunner(model, ctx, lean=False).graph
    gen = torch.Generator().manual_seed(0)
    masks = torch.stack([*[(torch.rand(g.n_writers, g.n_readers, generator=gen) < p) & g.valid
                           for p in (0.05, 0.3, 0.6, 0.9)]])
    truth = EdgeRunner(model, ctx, lean=False).evaluate(masks).values  # float64, the bridge's hooks
    eap_truth = score_edges(model, ctx, "eap-ig", 3, runner=EdgeRunner(model, ctx, lean=False)).scores[g.valid]
    model.to(dtype)
    hctx = prepare(model, tiny_pairs, ctx.probe, full_base_cache=True)
    lean, hooks = EdgeRunner(model, hctx), EdgeRunner(model, hctx, lean=False)
    assert lean.lean is not None, lean.lean_reason
    a, b = lean.evaluate(masks).values, hooks.evaluate(masks).values
    # no further from the float64 answer than the bridge's own route in the same dtype (measured here: bfloat16
    # 0.028 of the largest value against the hooks' 0.019; float16 0.0044 against 0.0039), and near it
    scale = float(truth.abs().max())
    assert float((a - truth).abs().max()) <= 2 * float((b - truth).abs().max()) + 1e-2 * scale
    assert float((a - truth).abs().max()) <= 0.1 * scale
    sa = score_edges(model, hctx, "eap-ig", 3, runner=lean).scores[g.valid]
    sb = score_edges(model, hctx, "eap-ig", 3, runner=hooks).scores[g.valid]
    assert torch.isfinite(sa).all()
    e = float(eap_truth.abs().max())  # (bfloat16: 0.013 of the largest score, lean and hooks alike)
    assert float((sa - eap_truth).abs().max()) <= 2 * float((sb - eap_truth).abs().max()) + 1e-2 * e
    assert float((sa - eap_truth).abs().max()) <= 0.1 * e
