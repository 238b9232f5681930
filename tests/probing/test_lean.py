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


def test_unsupported_models_say_why(tmp_path, gpt2_tok):
    assert "not the TransformerLens engine" in lean_unsupported(object())
    with pytest.raises(ConfigError, match="lean forward cannot run"):
        LeanBlocks(object(), 1)
    # a sliding window shorter than the context (Mistral v0.1's 4096 of 32768): the lean mask is the causal one
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(vocab_size=len(gpt2_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, sliding_window=8)
    MistralForCausalLM(cfg).save_pretrained(tmp_path)
    gpt2_tok.save_pretrained(tmp_path)
    assert "sliding-window" in lean_unsupported(as_engine(load_model(tmp_path, device="cpu")))


def test_attention_backends_name_real_kernels_and_leave_out_cudnn():
    """The kernels the lean forward allows on CUDA are real SDPBackend members (a typo would only surface on a GPU)
    and exclude cuDNN's, whose per-shape plans cost seconds per edge circuit on an H100 in bfloat16."""
    from torch.nn.attention import SDPBackend

    backends = LeanBlocks.attention_kernels()
    assert backends, "the lean forward should restrict the attention kernels on CUDA"
    assert SDPBackend.CUDNN_ATTENTION not in backends and SDPBackend.MATH in backends


def test_norms_mlp_and_projections_run_as_plain_calls_equal_to_the_modules(model):
    """The bridge puts its LinearBridge in place of the model's linear layers; the lean blocks call the layers
    underneath (and F.rms_norm / F.layer_norm) instead of going through the modules: bit for bit the Hugging Face
    modules' own outputs (the float64 Llama's norm is the module itself: it rounds through float32)."""
    eng = as_engine(model)
    blocks = LeanBlocks(eng, eng.dims.n_layers)
    dt = next(model.parameters()).dtype
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 5, eng.dims.d_model, generator=gen, dtype=dt)
    for ly, b in zip(blocks.layers, model.blocks):
        hf_attn = b.attn.original_component
        parts = [(ly.norm1, b.ln1.original_component), (ly.norm2, b.ln2.original_component), (ly.mlp_fn, b.mlp),
                 (ly.o_fn, getattr(hf_attn, "o_proj", None) or hf_attn.c_proj)]
        if ly.qkv is None:
            parts += list(zip(ly.qkv_fns, (hf_attn.q_proj, hf_attn.k_proj, hf_attn.v_proj)))
        else:
            parts += [(ly.qkv_fns[0], hf_attn.c_attn)]
        for fn, module in parts:
            with torch.no_grad():
                assert torch.equal(fn(x), module(x))
            # a plain function, or GPT-2's Conv1D itself: never the bridge's wrapper or the module's call machinery
            assert not isinstance(fn, torch.nn.Module) or type(fn).__name__ == "Conv1D"


def test_rotary_embedding_is_transformers_own():
    """_rope (roll and a signed sin) and its in-place form against transformers' apply_rotary_pos_emb."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from wordpos.probing.engines.lean import _rope, _rope_, _signed_sin

    gen = torch.Generator().manual_seed(4)
    q, k = (torch.randn(2, 3, 7, 16, generator=gen) for _ in range(2))
    ang = torch.rand(1, 7, 8, generator=gen) * 6
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    q_ref, k_ref = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
    ss = _signed_sin(sin)[:, None]
    assert torch.equal(_rope(q, cos[:, None], ss), q_ref) and torch.equal(_rope(k, cos[:, None], ss), k_ref)
    kk = k.clone()
    assert _rope_(kk, cos[:, None], ss) is kk and torch.equal(kk, k_ref)
    assert not torch.allclose(_rope(q, cos[:, None], _signed_sin(-sin)[:, None]), q_ref, atol=1e-2)  # the sign matters


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm_is_the_llama_modules_own_in_every_precision(dtype):
    """The lean blocks' RMSNorm against transformers' LlamaRMSNorm, bit for bit on the CPU: in half precision the
    module rounds the normalised input before it applies the weight (F.rms_norm's own weight would not)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from wordpos.probing.engines.lean import _norm_fn

    gen = torch.Generator().manual_seed(6)
    mod = LlamaRMSNorm(576, eps=1e-5)
    with torch.no_grad():
        mod.weight.copy_(1 + torch.randn(576, generator=gen))
    mod = mod.to(dtype)
    x = (3 * torch.randn(4, 9, 576, generator=gen)).to(dtype)
    fn = _norm_fn(mod)
    assert not isinstance(fn, torch.nn.Module)
    with torch.no_grad():
        assert torch.equal(fn(x), mod(x))


def test_a_gradient_pass_after_an_inference_mode_forward_of_the_same_shape(model):
    """The mask and rotary tables are kept per shape; those made under torch.inference_mode() are not (a gradient
    pass cannot save inference tensors for its backward)."""
    eng = as_engine(model)
    blocks = LeanBlocks(eng, eng.dims.n_layers)
    x0 = _x0(model, torch.randint(0, 500, (2, 9), generator=torch.Generator().manual_seed(7)))
    with torch.inference_mode():
        ref = blocks.forward(x0)
    x = x0.clone().requires_grad_(True)
    out = blocks.forward(x)
    out.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert (out.detach() - ref).abs().max() < _rel(model) * ref.abs().max()
