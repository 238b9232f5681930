"""Edge-level patching on other decoder architectures than GPT-2 and Llama, against plain TransformerLens hooks.

Ablating every edge out of one writer must equal ablating that writer itself (its output replaced by the corrupted
run's, with an ordinary hook on ``hook_z`` / ``hook_mlp_out``): everything downstream reads it through the residual
stream. In blocks that run attention and the MLP in parallel (GPT-NeoX/Pythia) a layer's MLP does not read that
layer's heads, so an edge graph that gives it those edges patches a path the model does not have and fails this.
Architectures where edge patching would be wrong (a reader hook the bridge never fires, a normalised branch, no
per-head q/k/v fork) are refused with one clear error, and ``wordpos run`` draws the head-level circuit instead."""

from __future__ import annotations

import json

import pytest
import torch

from wordpos.patching.edge_graph import EdgeGraph
from wordpos.patching.edge_runner import EdgeRunner, evaluate_masks
from wordpos.probing.errors import ConfigError

ARCHS = {
    # name: (config class, model class, config keywords); 2 layers, 4 heads, d_model 64
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(rotary_pct=0.25)),  # parallel attention and MLP
    "gpt_neox_sequential": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(rotary_pct=0.25, use_parallel_residual=False)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2)),  # q/k/v biases, GQA
    "phi": ("PhiConfig", "PhiForCausalLM", dict()),  # one norm feeds attention and MLP: the bridge never fires mlp_in
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(num_key_value_heads=2, head_dim=16)),  # post-norms
    # post-norms under other names
    "glm4": ("Glm4Config", "Glm4ForCausalLM", dict(num_key_value_heads=2, head_dim=16, pad_token_id=0, eos_token_id=0)),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=64)),
}


@pytest.fixture(scope="module")
def arch_dir(tmp_path_factory, gpt2_tok):
    """``make(name) -> path``: a tiny random model of that architecture, saved once per module."""
    import transformers

    made = {}

    def make(name: str):
        if name not in made:
            cfg_cls, model_cls, extra = ARCHS[name]
            torch.manual_seed(0)
            kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      vocab_size=len(gpt2_tok), max_position_embeddings=64, tie_word_embeddings=False)
            cfg = getattr(transformers, cfg_cls)(**{**kw, **extra})
            path = tmp_path_factory.mktemp(f"tiny-{name}")
            getattr(transformers, model_cls)(cfg).eval().save_pretrained(path)
            gpt2_tok.save_pretrained(path)
            made[name] = path
        return made[name]

    return make


@pytest.fixture(scope="module")
def arch_ctx(arch_dir, small_data, tiny_pairs):
    """``make(name) -> (model, ctx)``: the tiny model in float64 with a probe at layer 1 and the tiny pairs."""
    from wordpos.patching import prepare
    from wordpos.probing import WordIndexProbe, as_engine, collect_residuals, load_model

    def make(name: str):
        model = load_model(arch_dir(name), device="cpu")
        acts = collect_residuals(model, small_data, layers=[1], progress=False)
        probe = WordIndexProbe(layer=1, model=as_engine(model).name).fit(acts.train(1), acts.labels["train"])
        model.to(torch.float64)
        return model, prepare(model, tiny_pairs, probe)

    return make


def writer_ablated_by_hook(model, ctx, writer: str) -> float:
    """The context's metric with ``writer``'s output replaced by the corrupted run's: plain TransformerLens hooks."""
    clean, corrupted = ctx.pairs.clean, ctx.pairs.corrupted
    if writer.startswith("a"):
        L, h = int(writer[1]), int(writer.split(".h")[1])
        name = f"blocks.{L}.attn.hook_z"
    else:
        L, h = int(writer[1:]), None
        name = f"blocks.{L}.hook_mlp_out"
    with torch.no_grad():
        _, cache = model.run_with_cache(corrupted, names_filter=lambda n: n == name)

    def replace(act, hook):
        act = act.clone()
        if h is None:
            return cache[name]
        act[:, :, h] = cache[name][:, :, h]
        return act

    store = {}
    with torch.no_grad():
        model.run_with_hooks(clean, fwd_hooks=[(name, replace),
                                               ("blocks.1.hook_resid_post", lambda a, hook: store.update(out=a))])
    return float(ctx.metric(store["out"]))


@pytest.mark.parametrize("arch", ["gpt_neox", "gpt_neox_sequential", "qwen2"])
def test_every_edge_out_of_a_writer_ablated_equals_the_writer_ablated(arch_ctx, arch):
    model, ctx = arch_ctx(arch)
    g = EdgeGraph.for_model(ctx.engine.dims, 1)
    assert g.parallel_attn_mlp == (arch == "gpt_neox") == bool(model.cfg.parallel_attn_mlp)
    writers = ["a0.h1", "a0.h3", "m0", "a1.h2", "m1"]
    masks = g.full_mask().expand(len(writers), -1, -1).clone()
    for i, w in enumerate(writers):
        masks[i, g.writer_index(w)] = False
    got = evaluate_masks(model, ctx, masks).values.mean(1)
    for w, v in zip(writers, got.tolist()):
        ref = writer_ablated_by_hook(model, ctx, w)
        # float32 sums inside ProbeMetric: 1e-4 on a random model's small clean-corrupted span
        assert v == pytest.approx(ref, abs=1e-4), f"{arch}: every edge out of {w} ablated"
    # the writer's effect is not nothing (else the check above would not see a wrong edge)
    assert max(abs(v - 1.0) for v in got.tolist()) > 0.05


def test_parallel_blocks_have_no_head_to_same_layer_mlp_edges(arch_ctx):
    model, ctx = arch_ctx("gpt_neox")
    g = EdgeRunner(model, ctx).graph
    with pytest.raises(ConfigError, match="not an edge"):
        g.edge("a1.h0->m1")
    assert g.valid[g.writer_index("a0.h0"), g.reader_index("m1")]  # the layer before still writes to it
    assert EdgeGraph.from_dict(g.to_dict()).valid.equal(g.valid)
    earlier = {k: v for k, v in g.to_dict().items() if k != "parallel_attn_mlp"}  # a graph record saved before
    with pytest.raises(ConfigError, match="score the edges again"):
        EdgeRunner(model, ctx, EdgeGraph.from_dict(earlier))
    seq = EdgeGraph.build(2, 4, 4, 1)
    assert seq.valid[seq.writer_index("a1.h0"), seq.reader_index("m1")]
    assert int(seq.valid.sum()) - int(g.valid.sum()) == 2 * 4  # one per head and layer


@pytest.mark.parametrize("arch, why", [("phi", "does not run"), ("gemma2", "sum of its writers"),
                                       ("gptj", "per-head q/k/v reader inputs")])
def test_architectures_where_edge_patching_would_be_wrong_are_refused(arch_ctx, arch, why):
    model, ctx = arch_ctx(arch)
    with pytest.raises(ConfigError, match=why) as e:
        EdgeRunner(model, ctx)
    assert "--circuit heads" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow
def test_run_on_a_refused_architecture_draws_the_head_level_circuit(arch_dir, tmp_path, capsys):
    from wordpos.circuit.cli import main

    out = tmp_path / "run"
    rc = main(["run", "--model", str(arch_dir("phi")), "--out", str(out), "--n-prompts", "128", "--n-pairs", "4",
               "--n-random", "1", "--device", "cpu"])
    assert rc in (0, None)
    err = capsys.readouterr()
    assert "does not run" in err.out + err.err and "head-level path-patching circuit instead" in err.out + err.err
    summary = json.loads((out / "summary.json").read_text())
    assert "kind" not in summary["circuit"] and "cpr" not in summary["circuit"] and summary["circuit"]["heads"]
    assert (out / "report.html").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_post_norm_hidden_under_a_large_residual_is_still_refused(arch_dir, dtype):
    """Gemma 2's post-norms under a residual 2,500 times larger (its embeddings scaled): the branches' error is ~1e-3
    of the residual, which a bound of 3e-2 of the largest activation let through in float32. Float32 measures it
    against 1e-4 of each position's scale; half precision, where it is within rounding, refuses the layer's
    post-MLP norm by name."""
    from wordpos.probing import as_engine, load_model
    from wordpos.probing.engines.split_inputs import writer_sum_mismatch

    model = load_model(arch_dir("gemma2"), device="cpu").to(dtype)
    with torch.no_grad():
        model.original_model.model.embed_tokens.weight.mul_(2500)
    why = writer_sum_mismatch(as_engine(model))
    assert why is not None
    assert ("off by" in why) if dtype == torch.float32 else ("normalises a branch" in why)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("arch", ["glm4", "gemma2"])
def test_post_norms_are_refused_in_half_precision_by_what_the_norms_read(arch_dir, arch, dtype):
    """Under a residual 20,000 times larger than the branches, a post-norm's effect on the sums is within half
    precision's rounding; its input (a branch, not the residual stream) is not. GLM-4's post-norms are not named
    like Gemma 2's (``post_self_attn_layernorm``, ``post_mlp_layernorm``)."""
    from wordpos.probing import as_engine, load_model
    from wordpos.probing.engines.split_inputs import writer_sum_mismatch

    model = load_model(arch_dir(arch), device="cpu").to(dtype)
    with torch.no_grad():
        model.original_model.model.embed_tokens.weight.mul_(20000)
    why = writer_sum_mismatch(as_engine(model))
    assert why is not None and "normalises a branch" in why and "\n" not in why


def test_the_check_passes_the_models_it_should_in_half_precision(arch_dir, tiny_gpt2_dir):
    """No false refusals where rounding is the only difference (bfloat16/float16 bound 3e-2 of each position's scale;
    the models' own rounding measures about 1e-2 at worst)."""
    from wordpos.probing import as_engine, load_model
    from wordpos.probing.engines.split_inputs import writer_sum_mismatch

    for path in (arch_dir("qwen2"), arch_dir("gpt_neox"), tiny_gpt2_dir):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            assert writer_sum_mismatch(as_engine(load_model(path, device="cpu").to(dtype))) is None, (path, dtype)


@pytest.mark.slow
def test_a_resumed_run_refuses_an_edge_circuit_computed_on_the_wrong_graph(arch_dir, tmp_path, capsys):
    """An edge circuit an earlier wordpos computed on the sequential graph of a parallel model is refused on resume,
    with the fix; removing circuit/ recomputes only the circuit."""
    from wordpos.circuit.cli import main

    out = tmp_path / "run"
    args = ["run", "--model", str(arch_dir("gpt_neox")), "--out", str(out), "--n-prompts", "128", "--n-pairs", "4",
            "--n-random", "1", "--device", "cpu", "--quiet"]
    assert main(args) in (0, None)
    saved = out / "circuit" / "edge_circuit.json"
    d = json.loads(saved.read_text())
    assert d["graph"]["parallel_attn_mlp"] is True
    del d["graph"]["parallel_attn_mlp"]  # as an earlier wordpos wrote it
    saved.write_text(json.dumps(d))
    probe_written = (out / "probe" / "metrics.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "sequential edge graph" in err and f"Remove {out / 'circuit'}" in err and len(err.strip().splitlines()) == 1
    import shutil

    shutil.rmtree(out / "circuit")
    assert main(args) in (0, None)
    assert json.loads(saved.read_text())["graph"]["parallel_attn_mlp"] is True
    assert (out / "probe" / "metrics.json").stat().st_mtime_ns == probe_written


def test_an_edge_circuit_is_not_resumed_where_edge_patching_is_now_refused(tmp_path):
    from wordpos.circuit.pipeline import check_resumed_circuit

    cdir = tmp_path / "circuit"
    cdir.mkdir()
    (cdir / "circuit.json").write_text(json.dumps({"kind": "edge"}))
    with pytest.raises(ConfigError, match="edge patching is wrong on this model \\(post-norms\\)"):
        check_resumed_circuit(cdir, False, "post-norms")
    check_resumed_circuit(cdir, False)  # a sequential model's edge circuit (no graph record: an earlier one), or one
    # resumed by another engine (which checks nothing: refused is None)
    (cdir / "circuit.json").write_text(json.dumps({"heads": ["0.1"]}))  # a head-level circuit: nothing to refuse
    check_resumed_circuit(cdir, True, "post-norms")
    assert "head-level circuit of an earlier run" in check_resumed_circuit(cdir, False, None, True)  # kept, noted


def test_a_check_that_could_not_run_is_a_refusal_and_is_not_remembered(arch_dir, monkeypatch):
    from wordpos.probing import as_engine, load_model
    from wordpos.probing.engines import split_inputs

    engine = as_engine(load_model(arch_dir("qwen2"), device="cpu"))
    real = type(engine).run

    def out_of_memory(self, *a, **k):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(type(engine), "run", out_of_memory)
    why = split_inputs.split_inputs_unsupported(engine)
    assert why is not None and "could not run" in why and "out of memory" in why
    monkeypatch.setattr(type(engine), "run", real)
    assert split_inputs.split_inputs_unsupported(engine) is None  # checked again, not the remembered failure


def test_a_parallel_graph_on_a_sequential_model_says_so(arch_ctx):
    model, ctx = arch_ctx("gpt_neox_sequential")
    g = EdgeGraph.build(2, 4, 4, 1, parallel_attn_mlp=True)
    with pytest.raises(ConfigError, match="this model's blocks are sequential"):
        EdgeRunner(model, ctx, g)
