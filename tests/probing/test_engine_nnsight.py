"""Parity of the nnsight engine with the TransformerLens engine on tiny random GPT-2 and Llama models:
same residuals, z, patterns, q/k/v, patched outputs, stop/start semantics and collected residuals."""

from __future__ import annotations

import time

import pytest
import torch

from wordpos.probing import hooks as H
from wordpos.probing.engines import TLEngine, as_engine
from wordpos.probing.errors import ConfigError, ModelNotAvailableError

pytest.importorskip("nnsight")

from wordpos.probing.engines.nnsight_engine import NNsightEngine, check_remote_ready  # noqa: E402

TOL = 1e-4


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, gpt2_tok):
    """A 2-layer Llama (4 query heads, 2 key/value heads: grouped-query attention, rotary) with random
    weights and the GPT-2 tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(gpt2_tok), max_position_embeddings=128)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).eval().save_pretrained(path)
    gpt2_tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tiny_llama_dir):
    from wordpos.probing import load_model

    return load_model(tiny_llama_dir, device="cpu")


@pytest.fixture(scope="session")
def tiny_neox(tmp_path_factory, gpt2_tok):
    """A 2-layer GPT-NeoX (Pythia's architecture: fused per-head qkv, partial rotary, parallel
    attention and MLP)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from wordpos.probing import load_model

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        vocab_size=len(gpt2_tok), max_position_embeddings=128, rotary_pct=0.25)
    path = tmp_path_factory.mktemp("tiny-neox")
    GPTNeoXForCausalLM(cfg).eval().save_pretrained(path)
    gpt2_tok.save_pretrained(path)
    return load_model(path, device="cpu")


@pytest.fixture(scope="session", params=["gpt2", "llama", "gpt_neox"])
def engines(request):
    fixture = {"gpt2": "tiny_model", "llama": "tiny_llama", "gpt_neox": "tiny_neox"}[request.param]
    bridge = request.getfixturevalue(fixture)
    return TLEngine(bridge), NNsightEngine.from_model(bridge)


def has_resid_mid(engine) -> bool:
    return engine.arch.ln2 is not None


@pytest.fixture(scope="module")
def toks():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 1000, (3, 9), generator=g)


def all_sites(n_layers: int, resid_mid: bool = True) -> list[str]:
    names = []
    for L in range(n_layers):
        names += [H.resid(L, "resid_pre"), H.attn_qkv(L, "q"), H.attn_qkv(L, "k"), H.attn_qkv(L, "v"),
                  H.attn_pattern(L), H.attn_z(L), H.attn_out(L)]
        names += [H.resid(L, "resid_mid")] if resid_mid else []
        names += [H.mlp_out(L), H.resid(L, "resid_post")]
    return names


def assert_close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.shape == b.shape, f"{what}: shapes {tuple(a.shape)} vs {tuple(b.shape)}"
    diff = (a - b).abs().max().item()
    assert diff <= TOL, f"{what}: max abs diff {diff:.3g}"


def test_dims_and_protocol(engines):
    tl, nn = engines
    assert nn.dims == tl.dims
    assert nn.device == tl.device
    assert nn.tokenizer is tl.tokenizer
    assert as_engine(nn) is nn
    assert nn.name == tl.name


def test_every_site_and_logits_match(engines, toks):
    tl, nn = engines
    names = all_sites(tl.dims.n_layers, has_resid_mid(nn))
    out_tl, c_tl = tl.run(toks, cache=names)
    out_nn, c_nn = nn.run(toks, cache=names)
    assert_close(out_nn, out_tl, "logits")
    assert set(c_nn) == set(c_tl) == set(names)
    for name in names:
        assert_close(c_nn[name], c_tl[name], name)


def _zero_head(head: int, inplace: bool):
    def fn(z, name):
        if inplace:
            z[:, :, head] = 0.0
            return None
        z = z.clone()
        z[:, :, head] = 0.0
        return z

    return fn


@pytest.mark.parametrize("inplace", [False, True])
def test_zeroing_a_head_matches(engines, toks, inplace):
    tl, nn = engines
    hooks = [(H.attn_z(0), _zero_head(1, inplace))]
    cache = [H.attn_z(0), H.resid(1, "resid_pre"), H.resid(1, "resid_post")]
    out_tl, c_tl = tl.run(toks, hooks=hooks, cache=cache)
    out_nn, c_nn = nn.run(toks, hooks=hooks, cache=cache)
    clean, _ = nn.run(toks)
    assert (out_nn - clean).abs().max() > 1e-3, "the patch had no effect"
    assert c_nn[H.attn_z(0)][:, :, 1].abs().max() == 0
    assert_close(out_nn, out_tl, "patched logits")
    for name in cache:
        assert_close(c_nn[name], c_tl[name], name)


def test_replacing_resid_pre_matches(engines, toks):
    tl, nn = engines
    g = torch.Generator().manual_seed(2)
    new = torch.randn(*toks.shape, tl.dims.d_model, generator=g)
    hooks = [(H.resid(1, "resid_pre"), lambda x, name: new)]
    out_tl, c_tl = tl.run(toks, hooks=hooks, cache=[H.resid(1, "resid_pre"), H.resid(1, "resid_post")])
    out_nn, c_nn = nn.run(toks, hooks=hooks, cache=[H.resid(1, "resid_pre"), H.resid(1, "resid_post")])
    assert_close(c_nn[H.resid(1, "resid_pre")], new, "replaced resid_pre")
    assert_close(out_nn, out_tl, "logits after replacing resid_pre")
    assert_close(c_nn[H.resid(1, "resid_post")], c_tl[H.resid(1, "resid_post")], "resid_post after it")


@pytest.mark.parametrize("site", ["q", "k", "v", "pattern", "attn_out", "resid_mid", "mlp_out", "resid_post"])
def test_patching_other_sites_matches(engines, toks, site):
    tl, nn = engines
    if site == "resid_mid" and not has_resid_mid(nn):
        with pytest.raises(ConfigError, match="parallel"):
            nn.run(toks, cache=[H.resid(0, "resid_mid")])
        return
    name = {"q": H.attn_qkv(0, "q"), "k": H.attn_qkv(0, "k"), "v": H.attn_qkv(0, "v"),
            "pattern": H.attn_pattern(0), "attn_out": H.attn_out(0), "resid_mid": H.resid(0, "resid_mid"),
            "mlp_out": H.mlp_out(0), "resid_post": H.resid(0, "resid_post")}[site]

    def fn(act, _name):
        if site == "pattern":  # uniform attention over the causal prefix for head 0
            new = act.clone()
            q = act.shape[-2]
            new[:, 0] = torch.tril(torch.ones(q, q)) / torch.arange(1, q + 1)[:, None]
            return new
        return act * 0.5 + 0.25

    out_tl, _ = tl.run(toks, hooks=[(name, fn)])
    out_nn, _ = nn.run(toks, hooks=[(name, fn)])
    clean, _ = nn.run(toks)
    assert (out_nn - clean).abs().max() > 1e-4, "the patch had no effect"
    assert_close(out_nn, out_tl, f"logits after patching {name}")


def test_stop_at_layer_matches(engines, toks):
    tl, nn = engines
    n = tl.dims.n_layers
    for stop in range(n + 1):
        cache = [H.resid(L, "resid_post") for L in range(stop)]
        if stop < n:
            cache.append(H.resid(stop, "resid_pre"))
        out_tl, c_tl = tl.run(toks, cache=cache, stop_at_layer=stop)
        out_nn, c_nn = nn.run(toks, cache=cache, stop_at_layer=stop)
        assert out_nn.shape == (*toks.shape, tl.dims.d_model)
        assert_close(out_nn, out_tl, f"out at stop_at_layer={stop}")
        assert set(c_nn) == set(c_tl)
        for name in c_tl:
            assert_close(c_nn[name], c_tl[name], f"{name} at stop_at_layer={stop}")


def test_stop_at_layer_drops_later_hooks_like_tl(engines, toks):
    tl, nn = engines
    boom = [(H.resid(1, "resid_pre"), lambda x, name: x * 0), (H.attn_z(1), lambda x, name: x * 0)]
    out_tl, c_tl = tl.run(toks, hooks=boom, cache=[H.resid(1, "resid_pre"), H.attn_z(1)], stop_at_layer=1)
    out_nn, c_nn = nn.run(toks, hooks=boom, cache=[H.resid(1, "resid_pre"), H.attn_z(1)], stop_at_layer=1)
    assert set(c_nn) == set(c_tl) == {H.resid(1, "resid_pre")}
    assert_close(out_nn, out_tl, "out")
    assert out_nn.abs().max() > 0


def test_start_at_layer_matches(engines, toks):
    tl, nn = engines
    n = tl.dims.n_layers
    _, ref = tl.run(toks, cache=[H.resid(L, "resid_pre") for L in range(n)])
    for start in range(n):
        resid = ref[H.resid(start, "resid_pre")] + 0.1  # not what the dummy tokens would give
        cache = [H.resid(start, "resid_pre"), H.attn_z(start), H.resid(n - 1, "resid_post")]
        for stop in (None, n):
            out_tl, c_tl = tl.run(resid, cache=cache, start_at_layer=start, stop_at_layer=stop)
            out_nn, c_nn = nn.run(resid, cache=cache, start_at_layer=start, stop_at_layer=stop)
            assert_close(out_nn, out_tl, f"out start={start} stop={stop}")
            assert set(c_nn) == set(c_tl)
            for name in c_tl:
                assert_close(c_nn[name], c_tl[name], f"{name} start={start} stop={stop}")
        hooks = [(H.attn_z(start), _zero_head(0, False))]
        out_tl, _ = tl.run(resid, hooks=hooks, start_at_layer=start)
        out_nn, _ = nn.run(resid, hooks=hooks, start_at_layer=start)
        assert_close(out_nn, out_tl, f"patched out start={start}")



@pytest.mark.parametrize("p", [1, 4])
def test_past_runs_the_suffix_like_the_full_prompt(engines, toks, p):
    """``run(suffix, past=PrefixKV)`` on the Hugging Face model's own cache gives the TransformerLens engine's
    full-prompt values at the suffix positions: outputs, cached sites (attention patterns over prefix + suffix
    included), a patch, ``stop_at_layer`` and ``start_at_layer``. The prefix comes from an nnsight run too."""
    from wordpos.probing.engines.split_inputs import prefix_kv_unsupported, run_prefix

    tl, nn = engines
    n = tl.dims.n_layers
    assert prefix_kv_unsupported(nn) is None
    cache = [H.attn_z(0), H.attn_pattern(n - 1), H.resid(n - 1, "resid_post")]

    def zero_suffix(z, name):  # the reference patches the suffix positions only: the cached prefix is unpatched
        z = z.clone()
        z[:, p:, 1] = 0.0
        return z

    for stop in (1, n):
        pre = run_prefix(nn, toks[:, :p], stop, split=False)
        assert pre.length == p and len(pre.keys) == stop
        names = [c for c in cache if int(c.split(".")[1]) < stop]
        for hk, hk_ref in (((), ()), ([(H.attn_z(0), _zero_head(1, False))], [(H.attn_z(0), zero_suffix)])):
            ref, c_ref = tl.run(toks, hooks=hk_ref, cache=names, stop_at_layer=stop)
            out, c_out = nn.run(toks[:, p:], hooks=hk, cache=names, stop_at_layer=stop, past=pre)
            assert_close(out, ref[:, p:], f"suffix out p={p} stop={stop} hooks={bool(hk)}")
            for name in names:
                want = c_ref[name][..., p:, :] if "pattern" in name else c_ref[name][:, p:]
                assert_close(c_out[name], want, f"{name} p={p} stop={stop}")
    _, r = tl.run(toks, cache=[H.resid(1, "resid_pre")], stop_at_layer=n)
    resid = r[H.resid(1, "resid_pre")]
    ref, _ = tl.run(resid, start_at_layer=1, stop_at_layer=n)
    out, _ = nn.run(resid[:, p:], start_at_layer=1, stop_at_layer=n, past=run_prefix(nn, toks[:, :p], n, split=False))
    assert_close(out, ref[:, p:], f"start_at_layer=1 on the prefix p={p}")
    with pytest.raises(ConfigError, match="rows"):
        nn.run(toks[:2, p:], past=run_prefix(nn, toks[:, :p], n, split=False))


def test_remote_models_refuse_past(tiny_model, toks):
    from wordpos.probing.engines.split_inputs import prefix_kv_unsupported, run_prefix

    local = NNsightEngine.from_model(tiny_model)
    remote = NNsightEngine.from_model(tiny_model, remote="local")
    assert "remote" in prefix_kv_unsupported(remote)
    with pytest.raises(ConfigError, match="remote"):
        remote.run(toks[:, 3:], past=run_prefix(local, toks[:, :3], 2, split=False))

def test_collect_residuals_matches(engines, small_data):
    from wordpos.probing import collect_residuals

    tl, nn = engines
    t0 = time.perf_counter()
    a = collect_residuals(tl, small_data, layers="all", progress=False)
    t1 = time.perf_counter()
    b = collect_residuals(nn, small_data, layers="all", progress=False)
    t2 = time.perf_counter()
    print(f"\ncollect_residuals on {tl.name}: TL {t1 - t0:.3f}s, nnsight {t2 - t1:.3f}s")
    assert a.layers == b.layers
    for split in a.data:
        assert (a.labels[split] == b.labels[split]).all()
        diff = float(abs(a.data[split] - b.data[split]).max())
        assert diff <= TOL, f"{split}: max abs diff {diff:.3g}"
    for kind in ("resid_pre", "resid_mid") if has_resid_mid(nn) else ("resid_pre",):
        a = collect_residuals(tl, small_data, layers=[1], kind=kind, splits=["test"], progress=False)
        b = collect_residuals(nn, small_data, layers=[1], kind=kind, splits=["test"], progress=False)
        assert float(abs(a.data["test"] - b.data["test"]).max()) <= TOL


def test_from_directory_matches_bridge(tiny_gpt2_dir, tiny_model, toks):
    nn = NNsightEngine.from_model(tiny_gpt2_dir, device="cpu")
    out_nn, _ = nn.run(toks)
    out_tl, _ = TLEngine(tiny_model).run(toks)
    assert_close(out_nn, out_tl, "logits of the directory-built engine")
    assert nn.tokenizer.padding_side == tiny_model.tokenizer.padding_side


def test_bridge_engine_shares_weights(tiny_model):
    nn = NNsightEngine.from_model(tiny_model)
    ours = {p.data_ptr() for p in nn.model._module.parameters()}
    theirs = {p.data_ptr() for p in tiny_model.parameters()}
    assert ours <= theirs


def test_make_engine(tiny_gpt2_dir, tiny_model, toks):
    from wordpos.probing.engines import make_engine

    nn = make_engine(tiny_model, engine="nnsight")
    assert isinstance(nn, NNsightEngine)
    assert isinstance(make_engine(TLEngine(tiny_model), engine="nnsight"), NNsightEngine)
    assert isinstance(make_engine(tiny_model), TLEngine)
    with pytest.raises(ConfigError, match="engine"):
        make_engine(tiny_model, engine="jax")


def test_unknown_hook_and_bad_inputs(engines, toks):
    _, nn = engines
    with pytest.raises(ConfigError, match="does not serve"):
        nn.run(toks, cache=["blocks.0.mlp.hook_post"])
    with pytest.raises(ConfigError, match="out of range"):
        nn.run(toks, stop_at_layer=nn.dims.n_layers + 1)
    with pytest.raises(ConfigError, match="residual stream"):
        nn.run(toks, start_at_layer=1)


def test_remote_code_path_simulated_locally(tiny_model, toks):
    """nnsight's remote='local' serializes the trace as for NDIF and runs it here."""
    tl = TLEngine(tiny_model)
    nn = NNsightEngine.from_model(tiny_model, remote="local")
    hooks = [(H.attn_z(0), _zero_head(1, False))]
    cache = [H.attn_z(0), H.resid(1, "resid_post")]
    out_tl, c_tl = tl.run(toks, hooks=hooks, cache=cache)
    out_nn, c_nn = nn.run(toks, hooks=hooks, cache=cache)
    assert_close(out_nn, out_tl, "logits through the remote code path")
    for name in cache:
        assert_close(c_nn[name], c_tl[name], name)
    out_nn, c_nn = nn.run(toks, cache=cache, stop_at_layer=1)
    assert set(c_nn) == {H.attn_z(0)} and out_nn.shape == (*toks.shape, 64)


def test_remote_without_key_fails_fast(monkeypatch, tiny_model):
    from nnsight import CONFIG

    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    monkeypatch.setattr(CONFIG.API, "APIKEY", None)
    t0 = time.perf_counter()
    with pytest.raises(ModelNotAvailableError, match="NDIF API key"):
        NNsightEngine.from_model("EleutherAI/pythia-70m", remote=True)
    assert time.perf_counter() - t0 < 2


def test_remote_unreachable_host_fails_fast(monkeypatch):
    from nnsight import CONFIG

    monkeypatch.setattr(CONFIG.API, "APIKEY", "not-a-real-key")
    monkeypatch.setattr(CONFIG.API, "HOST", "http://127.0.0.1:9")  # discard port: refused at once
    t0 = time.perf_counter()
    with pytest.raises(ModelNotAvailableError, match="cannot be reached"):
        check_remote_ready(timeout=1.0)
    assert time.perf_counter() - t0 < 3
