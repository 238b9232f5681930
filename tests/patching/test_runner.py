"""The one runner: every registered method reaches the model only through it; its sizing policy, the patching
config, result semantics (NaN = not measured, older files) and `--probe` on a `wordpos run` directory."""

import json
import sys
import warnings

import numpy as np
import pytest
import torch

from wordpos.patching import registry
from wordpos.patching.experiment import PatchConfig, load_probe
from wordpos.patching.results import EffectResult
from wordpos.patching.runner import Edit, Intervention, Request, run_interventions
from wordpos.patching.sizing import Sizing
from wordpos.probing import ConfigError, CorruptFileError, hooks
from wordpos.probing.engines import TLEngine


def test_every_registered_method_reaches_the_model_only_through_the_runner(planted_model, planted_probe,
                                                                            planted_data, tmp_path, monkeypatch):
    engine = TLEngine(planted_model)
    real = engine.run
    callers: list[tuple[str, bool]] = []

    def spy(*a, **k):
        callers.append((sys._getframe(1).f_globals["__name__"], torch.is_grad_enabled()))
        return real(*a, **k)

    monkeypatch.setattr(engine, "run", spy)
    cfg = PatchConfig(model=engine.name, n_pairs=4, n_prompts=60, n_random=1, top_k=2, by_pos=True,
                      sizing=Sizing(by_pos_heads=2, role_prompts=40))
    names = sorted(registry.methods())
    assert {"activation", "attribution", "path", "ablation", "head_means", "roles"} <= set(names)
    for name in names:
        callers.clear()
        inputs = registry.StageInputs(engine=engine, probe=planted_probe, config=cfg, vocab=planted_data.vocab,
                                      progress=False, out=tmp_path / name)
        out = registry.get(name).run(inputs)
        assert out.results and callers, name
        outside = [(m, g) for m, g in callers if m != "wordpos.patching.runner"]
        if name == "attribution":  # its one gradient pass (forward + backward) is the only run outside the runner
            assert outside == [("wordpos.patching.attribution", True)], outside
        else:
            assert not outside, (name, outside)


def test_runner_batches_heterogeneous_interventions_like_single_runs(tiny_model):
    """Interventions with different edits folded into one forward give what each gives alone (and what a
    plain hook run gives)."""
    engine = TLEngine(tiny_model)
    toks = torch.randint(0, 1000, (3, 9))
    with torch.no_grad():
        _, src = tiny_model.run_with_cache(toks.flip(0))
    ivs = [Intervention(), Intervention((Edit(hooks.attn_z(0), "zero", 1),)),
           Intervention((Edit(hooks.attn_z(0), "source", 2, pos=4), Edit(hooks.mlp_out(1), "zero"))),
           Intervention((Edit(hooks.attn_z(1), "source", 0),))]
    req = Request(tokens=toks, read=lambda out, cache, P, sl: out.reshape(P, -1, *out.shape[1:]), stop_at_layer=2,
                  source={k: src[k] for k in (hooks.attn_z(0), hooks.attn_z(1))})
    together = run_interventions(engine, req, ivs, max_tokens=10**6, progress=False)
    alone = torch.cat([run_interventions(engine, req, [iv], max_tokens=1, progress=False) for iv in ivs])
    assert torch.allclose(together, alone, atol=1e-5)

    def z0(act, hook):
        act = act.clone()
        act[:, 4, 2] = src[hooks.attn_z(0)][:, 4, 2]
        return act

    with torch.no_grad():
        holder = {}
        tiny_model.run_with_hooks(toks, fwd_hooks=[(hooks.attn_z(0), z0), (hooks.mlp_out(1), lambda a, hook: a * 0),
                                                   (hooks.resid(1), lambda a, hook: holder.setdefault("r", a))])
    assert torch.allclose(together[2], holder["r"], atol=1e-5)
    with pytest.raises(ConfigError, match="no patches"):
        run_interventions(engine, req, [], progress=False)


def test_sizing_is_validated_and_round_trips():
    s = Sizing(candidates=5)
    assert Sizing.from_dict(s.to_dict()) == s
    assert s.tokens_per_forward("cpu") == 4096 and s.tokens_per_forward("meta") == 1 << 18
    # prompts per batch: cache-sized on the CPU, up to the token budget on an accelerator; a caller's explicit batch
    # size (attention patterns are [b, head, T, T]) holds on both
    assert s.prompts_per_batch("cpu") == 64 and s.prompts_per_batch("meta") == 4096
    assert {s.with_prompt_batch(8).prompts_per_batch(d) for d in ("cpu", "meta")} == {8}
    assert PatchConfig(sizing=Sizing(accelerator_prompts=7)).identity() == PatchConfig().identity()  # how fast only
    with pytest.raises(ConfigError, match="positive integer"):
        Sizing(prompt_batch=0)
    with pytest.raises(ConfigError, match="unknown sizing fields"):
        Sizing.from_dict({"candidate": 3})
    cfg = PatchConfig.from_dict({"method": "ablation", "sizing": {"candidates": 3}})
    assert cfg.sizing.candidates == 3 and cfg.identity()["sizing"]["candidates"] == 3
    assert PatchConfig(max_tokens=100).run_sizing().tokens_per_forward("cpu") == 100
    for bad, match in (({"method": "boil"}, "registered methods"), ({"direction": "up"}, "direction"),
                       ({"n_pairs": 0}, "n_pairs"), ({"typo": 1}, "unknown patch settings")):
        with pytest.raises(ConfigError, match=match):
            PatchConfig.from_dict(bad)


def test_results_rank_by_change_and_treat_nan_as_unmeasured(tmp_path):
    e = np.array([[0.1, np.nan], [-0.5, 0.2]])
    res = EffectResult(e, ("layer", "head"), "ablation", "acc", direction="ablation")
    assert [h["head"] for h in res.top_heads(10)] == ["1.0", "1.1", "0.0"]  # NaN never ranked
    assert [h["head"] for h in res.top_heads(1, order="decrease")] == ["1.0"]
    by_pos = EffectResult(np.array([[[0.1, 0.2], [np.nan, np.nan]]]), ("layer", "head", "pos"), "activation", "m")
    assert by_pos.head_effects()[0, 0] == pytest.approx(0.3) and np.isnan(by_pos.head_effects()[0, 1])
    res.save(tmp_path)
    back = EffectResult.load(tmp_path)
    assert np.array_equal(np.isnan(back.effects), np.isnan(e)) and back.direction == "ablation"


def test_format_1_files_are_converted_to_changes(tmp_path):
    from wordpos.probing.io import write_json, write_npz

    levels = np.array([[1.0, 0.4], [0.9, 1.0]])  # noising levels: 1 = unpatched
    write_npz(tmp_path / "effects.npz", effects=levels)
    write_json(tmp_path / "effects.json", {"format": "wordpos.EffectResult/1", "axes": ["layer", "head"],
                                           "shape": [2, 2], "method": "activation", "metric": "m",
                                           "direction": "noising", "n_prompts": 4, "coords": {}, "config": {}})
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        res = EffectResult.load(tmp_path)
    assert w and np.allclose(res.effects, levels - 1.0) and res.top_heads(1)[0]["head"] == "0.1"
    (tmp_path / "effects.json").write_text(json.dumps({"format": "wordpos.EffectResult/9"}))
    with pytest.raises(CorruptFileError, match="reads"):
        EffectResult.load(tmp_path)


def test_probe_from_a_wordpos_run_directory(planted_probe, tmp_path):
    run = tmp_path / "run"
    planted_probe.save(run / "probe" / "probe")  # where `wordpos run` keeps the best layer's probe
    probe, where = load_probe(run)
    assert where == run / "probe" / "probe" and probe.layer == planted_probe.layer
    with pytest.raises(CorruptFileError, match="wordpos run"):
        load_probe(tmp_path / "nothing")


def test_ablation_stage_leaves_heads_it_did_not_measure_nan(tiny_model, tiny_probe, small_data):
    """With fewer candidates than heads, only the heads attribution ranks highest are ablated; the others are NaN
    (not a 0.0 drop) and never ranked."""
    engine = TLEngine(tiny_model)
    cfg = PatchConfig(model=engine.name, n_pairs=4, n_prompts=60, n_random=0, top_k=1, sizing=Sizing(candidates=3))
    out = registry.get("ablation").run(registry.StageInputs(engine=engine, probe=tiny_probe, config=cfg,
                                                            vocab=small_data.vocab, progress=False))
    res = out.results["heads"]
    measured = np.isfinite(res.effects)
    assert measured.sum() == 3 and sorted(res.config["candidates"]) == sorted(
        f"{L}.{h}" for L, h in zip(*np.nonzero(measured)))
    assert all(np.isfinite(h["effect"]) for h in res.top_heads(10)) and len(res.top_heads(10)) == 3
    fig = out.figs["heads"]()  # drawn when saved
    assert fig.data[0].hoverongaps is False and np.isnan(np.asarray(fig.data[0].z, dtype=float)).sum() == 5


def test_coalescing_merges_only_groups_that_fit_one_forward_together():
    """The accelerator's grouping rule (``runner._coalesce``): consecutive start layers merge while their
    interventions fit one forward (at most ``per``), from the earliest layer; a group that would overflow starts a
    new one; token-input interventions (start ``None``) stay apart."""
    from wordpos.patching.runner import _coalesce

    groups = {None: [15], 0: [0, 1, 2, 3, 4], 1: [5, 6, 7, 8, 9], 2: [10, 11, 12, 13, 14]}
    assert _coalesce(groups, 10) == {None: [15], 0: list(range(10)), 2: [10, 11, 12, 13, 14]}
    assert _coalesce(groups, 15) == {None: [15], 0: list(range(15))}
    assert _coalesce(groups, 9) == {k: v for k, v in groups.items()}
    assert _coalesce({3: [0], 1: [1]}, 2) == {1: [1, 0]}
