"""The hook-free lean blocks (probing.engines.lean) against TransformerLens' bridge: a plain run, a run on cached
prefix keys/values, a patched per-head query/key/value input and MLP input (the bridge's split-input hooks), and
each head's output (hook_z @ W_O), on a tiny GPT-2 and a tiny grouped-query Llama with RoPE, in float64.

Tolerance 1e-7 relative: Hugging Face's Llama attention rounds its scores to float32 for the softmax whatever the
dtype, so two float64 routes whose scores differ in the 16th digit can differ in the 8th after it (GPT-2 agrees to
1e-14). A wrong head, slot, position or weight shows at 1e-2 and above."""

from __future__ import annotations

import pytest
import torch

from wordpos.probing import load_model
from wordpos.probing.engines import as_engine
from wordpos.probing.engines.lean import LeanBlocks, lean_unsupported
from wordpos.probing.engines.split_inputs import run_prefix
from wordpos.probing.errors import ConfigError

REL = 1e-7


def _rel(model) -> float:
    return REL if next(model.parameters()).dtype == torch.float64 else 1e-5


def _tl(model, tokens, stop, hooks=(), split=False):
    """The residual entering block ``stop`` and each layer's hook_z, by the bridge with ordinary hooks."""
    store = {}
    names = [f"blocks.{L}.attn.hook_z" for L in range(stop)]
    grab = [(n, lambda a, hook, n=n: store.__setitem__(n, a)) for n in names]
    grab.append((f"blocks.{stop - 1}.hook_resid_post", lambda a, hook: store.__setitem__("out", a)))
    if split:
        model.set_use_split_qkv_input(True)
        model.set_use_hook_mlp_in(True)
    try:
        with torch.no_grad():
            model.run_with_hooks(tokens, fwd_hooks=list(hooks) + grab)
    finally:
        model.set_use_split_qkv_input(False)
        model.set_use_hook_mlp_in(False)
    return store


def _x0(model, tokens):
    store = {}
    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_pre", lambda a, hook: store.__setitem__("x", a))])
    return store["x"]


def test_plain_and_cached_prefix_runs_equal_the_bridge(model):
    eng = as_engine(model)
    assert lean_unsupported(eng) is None
    stop = eng.dims.n_layers
    tokens = torch.randint(0, 500, (3, 14), generator=torch.Generator().manual_seed(0))
    ref = _tl(model, tokens, stop)["out"]
    blocks = LeanBlocks(eng, stop)
    x0 = _x0(model, tokens)
    with torch.no_grad():
        out = blocks.forward(x0)
        pre = run_prefix(eng, tokens[:, :6], stop)
        suf = blocks.forward(x0[:, 6:], start=6, past=(pre.keys, pre.values))
    assert (out - ref).abs().max() < _rel(model) * ref.abs().max()
    assert (suf - ref[:, 6:]).abs().max() < _rel(model) * ref.abs().max()


def test_patched_reader_inputs_and_head_outputs_equal_the_bridges_hooks(model):
    """A shift added to one head's query input, one key/value head's value input and one MLP's input: the lean
    forward's reader callback vs the bridge's split-input hooks; the heads' writes vs hook_z @ W_O."""
    eng = as_engine(model)
    stop = eng.dims.n_layers
    H, Hkv = eng.dims.n_heads, eng.dims.n_kv_heads
    tokens = torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)
    dt = next(model.parameters()).dtype
    shift = {s: torch.randn(eng.dims.d_model, generator=gen, dtype=dt) for s in ("q", "v", "mlp")}
    where = {"q": (1, H - 1), "v": (1, Hkv - 1), "mlp": (0, None)}

    def tl_hook(site):
        L, slot = where[site]
        name = f"blocks.{L}.hook_mlp_in" if site == "mlp" else f"blocks.{L}.attn.hook_{site}_input"

        def hook(act, hook):
            act = act.clone()
            if slot is None:
                act += shift[site]
            else:
                act[:, :, slot] += shift[site]
            return act
        return name, hook

    ref = _tl(model, tokens, stop, [tl_hook(s) for s in where], split=True)
    n_slots = {"q": H, "k": Hkv, "v": Hkv}

    def reader(L, site, resid, out=None):
        if site not in where or where[site][0] != L:
            return None
        if site == "mlp":
            return resid + shift[site]
        act = resid[:, :, None].expand(-1, -1, n_slots[site], -1).clone()
        act[:, :, where[site][1]] += shift[site]
        if out is not None and site == "q":  # the query input written into the lean blocks' buffer
            return out.copy_(act)
        return act

    heads = {}
    with torch.no_grad():
        out = LeanBlocks(eng, stop).forward(_x0(model, tokens), reader=reader,
                                            writer=lambda L, kind, o: heads.__setitem__((L, kind), o))
    scale = ref["out"].abs().max()
    assert (out - ref["out"]).abs().max() < _rel(model) * scale
    assert (out - _tl(model, tokens, stop)["out"]).abs().max() > 1e-3 * scale  # the shifts do change the output
    for L in range(stop):
        W_O = model.blocks[L].attn.W_O.detach()
        want = torch.einsum("btha,had->bthd", ref[f"blocks.{L}.attn.hook_z"], W_O)
        assert (heads[(L, "heads")] - want).abs().max() < _rel(model) * max(1.0, float(want.abs().max()))


def test_unsupported_models_say_why():
    assert "not the TransformerLens engine" in lean_unsupported(object())
    with pytest.raises(ConfigError, match="lean forward cannot run"):
        LeanBlocks(object(), 1)


def test_attention_backends_name_real_kernels_and_leave_out_cudnn():
    """The kernels the lean forward allows on CUDA are real SDPBackend members (a typo would only surface on a GPU)
    and exclude cuDNN's, whose per-shape plans cost seconds per edge circuit on an H100 in bfloat16."""
    from torch.nn.attention import SDPBackend

    backends = LeanBlocks.attention_kernels()
    assert backends, "the lean forward should restrict the attention kernels on CUDA"
    assert SDPBackend.CUDNN_ATTENTION not in backends and SDPBackend.MATH in backends
