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
    seq = EdgeGraph.build(2, 4, 4, 1)
    assert seq.valid[seq.writer_index("a1.h0"), seq.reader_index("m1")]
    assert int(seq.valid.sum()) - int(g.valid.sum()) == 2 * 4  # one per head and layer


@pytest.mark.parametrize("arch, why", [("phi", "never runs"), ("gemma2", "sum of its writers"),
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
    assert "never runs" in err.out + err.err and "head-level path-patching circuit instead" in err.out + err.err
    summary = json.loads((out / "summary.json").read_text())
    assert "kind" not in summary["circuit"] and "cpr" not in summary["circuit"] and summary["circuit"]["heads"]
    assert (out / "report.html").exists()
