"""The README's notebook example, run as written on the planted model (whose circuit is set by hand): every call
it shows works, finds the planted heads, and every object it makes prints as a short summary in a notebook."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

README = Path(__file__).resolve().parents[2] / "README.md"

# The README's example is written for GPT-2 on a GPU; these edits (each must match once) point it at the planted
# model (counter 0.2 feeding receiver 1.1, probe after layer 1) at test size.
EDITS = {
    'model = load_model("gpt2", device="cuda")': "model = _planted",
    "n_prompts=4096": "n_prompts=600",
    "layer=3": "layer=1",
    "n_pairs=64": "n_pairs=12",
    '"3.4,2.1"': '"0.2,1.1"',
    "[(3, 4), (2, 1)]": "[(0, 2), (1, 1)]",
}


def _example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert blocks, "README.md has no ```python block"
    code = blocks[0]
    for old, new in EDITS.items():
        assert code.count(old) >= 1, f"the README example no longer contains {old!r}: update EDITS"
        code = code.replace(old, new)
    return code


@pytest.fixture(scope="module")
def example(planted_model):
    ns: dict = {"_planted": planted_model}
    exec(compile(_example(), str(README), "exec"), ns)  # noqa: S102 - the README's own example
    return ns


def test_the_readme_example_finds_the_planted_circuit(example):
    ns = example
    model, data, acts, probe = ns["model"], ns["data"], ns["acts"], ns["probe"]
    acc = probe.score(acts.test(layer=1), data.test.labels)
    assert [t["head"] for t in ns["patch_heads"](model, ns["ctx"]).top_heads(2)] == ["0.2", "1.1"]
    abl = ns["ablate_heads"](model, probe, data, "0.2,1.1", method="mean", n_random=0)
    assert acc > abl.baseline_abs_pos_accuracy + 0.2
    # without the counter and its receiver the probe knows what the absolute position tells it, no more
    assert abs(abl.accuracy - abl.baseline_abs_pos_accuracy) < 0.06
    ev = ns["anchor_evidence"](model, data.test, [(0, 2), (1, 1)])
    assert ev["0.2"]["counter_score"] > 0.9 > 0.1 > ev["1.1"]["counter_score"]
    curve, circuit = ns["curve"], ns["circuit"]
    assert curve.cpr > curve.random_cpr_mean + 0.3
    assert circuit.reached and circuit.nodes["head_names"] == ["a0.h2", "a1.h1"] and not circuit.nodes["mlp_names"]


def test_every_object_of_the_example_prints_as_a_short_summary(example):
    """A notebook shows a cell's value with repr(): a dataset, a context or residuals used to print every token
    (hundreds of thousands of characters); now each is a line with its sizes and headline numbers."""
    ns = example
    objects = {k: v for k, v in ns.items() if not k.startswith("_") and not callable(v) and k != "__builtins__"}
    objects.update(ablation=ns["ablate_heads"](ns["model"], ns["probe"], ns["data"], "0.2,1.1", method="mean",
                                               n_random=2),
                   effects=ns["patch_heads"](ns["model"], ns["ctx"]), graph=ns["scores"].graph,
                   metric=ns["ctx"].metric, vocab=ns["data"].vocab, train=ns["data"].train)
    assert {"data", "acts", "probe", "pairs", "ctx", "scores", "curve", "circuit"} <= set(objects)
    for name, obj in objects.items():
        if isinstance(obj, (torch.nn.Module, float, int, tuple)) or type(obj).__module__ == "builtins":
            continue
        text = repr(obj)
        assert len(text) <= 400, f"repr({name}) is {len(text)} characters: {text[:200]}..."
        assert "tensor(" not in text and "array(" not in text, f"repr({name}) prints its data: {text[:200]}"
    # the summaries show the planted ground truth, not just sizes
    assert "largest: 0.2 +" in repr(objects["effects"])
    assert f"{len(ns['data'].train)}" in repr(ns["data"]) and "7 words" in repr(ns["data"])
    assert "heads a0.h2, a1.h1; no MLPs" in repr(ns["circuit"]) and "target 0.8 reached" in repr(ns["circuit"])


def test_the_results_draw_themselves(example):
    """``figure()`` on the example's results: the heatmap's two largest cells are the planted heads, the diagram
    draws exactly the circuit's edges, the layer curve plots each layer's held-out accuracy."""
    from wordpos.circuit.edge_render import drawn_edge_count
    from wordpos.probing import ConfigError, sweep_layers

    ns = example
    effects = ns["patch_heads"](ns["model"], ns["ctx"])
    z = np.asarray(effects.figure().data[0].z, dtype=float)
    top = np.argsort(-np.nan_to_num(z, nan=-np.inf), axis=None)[:2]
    assert sorted(np.unravel_index(top, z.shape)[0].tolist()) == [0, 1]
    assert {f"{L}.{h}" for L, h in zip(*np.unravel_index(top, z.shape))} == {"0.2", "1.1"}
    assert drawn_edge_count(ns["circuit"].figure()) == ns["circuit"].n_edges
    sweep = sweep_layers(ns["acts"], progress=False)
    held_out = sweep.figure().data[0]
    assert list(held_out.x) == [0, 1] and held_out.y[1] == sweep.results[1].accuracy
    assert held_out.y[1] > sweep.best.baseline_abs_pos_accuracy + 0.2
    with pytest.raises(ConfigError, match="no figure for effects over"):
        type(effects)(np.zeros((2, 3, 4)), ("pair", "layer", "pos"), "activation", "m").figure()


def test_one_calls_heads_go_into_the_next(example):
    """``top_heads()``' dicts and the circuit's head names are taken wherever heads are: the same heads as the
    ``"L.H"`` string, hence the same numbers."""
    ns = example
    model, probe, data = ns["model"], ns["probe"], ns["data"]
    assert [t["head"] for t in ns["top"][:2]] == ["0.2", "1.1"]
    by_string = ns["ablate_heads"](model, probe, data, "0.2,1.1", method="mean", n_random=0, refit=False)
    by_dicts = ns["ablate_heads"](model, probe, data, ns["top"][:2], method="mean", n_random=0, refit=False)
    assert by_dicts.heads == by_string.heads == [(0, 2), (1, 1)] and by_dicts.accuracy == by_string.accuracy
    evidence = ns["anchor_evidence"](model, data.test, ns["circuit"].nodes["head_names"])
    assert set(evidence) == {"0.2", "1.1"}


def test_a_model_object_as_the_probes_model_and_a_probe_below_baseline_are_named(example):
    """Two natural slips: ``model=model`` (the object, where the probe takes its name) is refused with the fix,
    and ablating heads under a probe that reads no more than the position does warns that nothing can show."""
    from wordpos.probing import ConfigError, WordIndexProbe

    ns = example
    acts, data, model = ns["acts"], ns["data"], ns["model"]
    with pytest.raises(ConfigError, match=r"model= names the model.*model=acts.model_name"):
        WordIndexProbe(layer=1, model=model).fit(acts.train(layer=1), data.train.labels)
    # regularised almost to its prior, a probe predicts little more than the commonest word index: below baseline
    weak = WordIndexProbe(layer=0, model=acts.model_name, C=1e-4).fit(acts.train(layer=0), data.train.labels)
    with pytest.warns(UserWarning, match="no more than the position-only baseline"):
        ns["ablate_heads"](model, weak, data, "0.0", method="mean", n_random=0, refit=False)


def test_every_result_saves_and_loads(example, tmp_path):
    """The results a notebook makes round-trip through their files: the same numbers, the same predictions."""
    from wordpos.patching import AblationResult, EffectResult, HeadRoles, head_roles
    from wordpos.probing import ProbeSweep, sweep_layers

    ns = example
    model, data, acts = ns["model"], ns["data"], ns["acts"]
    sweep = sweep_layers(acts, progress=False)
    assert sweep.save(tmp_path / "sweep") == tmp_path / "sweep"
    back = ProbeSweep.load(tmp_path / "sweep")
    assert back.results == sweep.results and back.best_layer == sweep.best_layer
    for L in sweep.probes:
        assert np.array_equal(back.probes[L].predict(acts.test(L)), sweep.probes[L].predict(acts.test(L)))
    older = sweep_layers(acts, progress=False, layers=[0, 1])  # an older sweep with a layer this one lacks
    older.results[7], older.probes[7] = older.results[0], older.probes[0]
    older.save(tmp_path / "over")
    assert set(ProbeSweep.load(sweep_subset(sweep, [1]).save(tmp_path / "over")).results) == {1}
    assert not (tmp_path / "over" / "layer7").exists() and not (tmp_path / "over" / "layer0").exists()
    abl = ns["ablate_heads"](model, ns["probe"], data, "0.2,1.1", method="mean", n_random=2)
    assert AblationResult.load(abl.save(tmp_path)) == abl == AblationResult.load(tmp_path)
    roles = head_roles(model, data.test, layers=[0, 1])
    again = HeadRoles.load(roles.save(tmp_path))
    assert all(np.array_equal(again.scores[k], v, equal_nan=True) for k, v in roles.scores.items())
    assert again.label(0, 2) == roles.label(0, 2) == "anchor counter"
    eff = ns["patch_heads"](model, ns["ctx"])
    assert np.array_equal(EffectResult.load(eff.save(tmp_path / "eff")).effects, eff.effects, equal_nan=True)
    from wordpos.probing import CorruptFileError

    for cls, file in ((AblationResult, "ablation.json"), (HeadRoles, "head_roles.json")):
        record = json.loads((tmp_path / file).read_text())
        (tmp_path / file).write_text(json.dumps({"format": record["format"]}))
        with pytest.raises(CorruptFileError, match="does not match"):
            cls.load(tmp_path)


def sweep_subset(sweep, layers):
    from wordpos.probing import ProbeSweep

    return ProbeSweep({L: sweep.results[L] for L in layers}, {L: sweep.probes[L] for L in layers})
