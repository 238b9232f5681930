"""Both directions on the planted model: denoising and noising put the same two heads on top (the counter 0.2
first), and the stored signed changes point the way each direction predicts (library and `wordpos patch`)."""

import json

import numpy as np
import pytest

from wordpos.patching import attribute_heads, patch_heads, prepare
from wordpos.probing.models.planted import PLANTED

COUNTER = PLANTED.counter


def _top(res, k=2):
    return [(h["layer"], h["index"]) for h in res.top_heads(k)]


@pytest.fixture(scope="module")
def noising_ctx(planted_model, planted_ctx, planted_probe):
    return prepare(planted_model, planted_ctx.pairs, planted_probe, direction="noising")


@pytest.mark.parametrize("method", ["activation", "attribution"])
def test_both_directions_rank_the_same_heads_with_signed_changes(planted_model, planted_ctx, noising_ctx, method):
    fn = (lambda ctx: patch_heads(planted_model, ctx, progress=False)) if method == "activation" else \
        (lambda ctx: attribute_heads(planted_model, ctx))
    den, noi = fn(planted_ctx), fn(noising_ctx)
    assert den.direction == "denoising" and noi.direction == "noising"
    top_d, top_n = _top(den), _top(noi)
    assert top_d[0] == COUNTER and top_n[0] == COUNTER
    assert set(top_d) == set(top_n)
    for L, h in top_d:
        # patched − unpatched: restoring clean activations raises the metric, corrupting them lowers it
        assert den.effects[L, h] > 0.05 and noi.effects[L, h] < -0.05
        # oriented toward the source run, both directions agree in sign
        assert np.sign(den.toward_source()[L, h]) == np.sign(noi.toward_source()[L, h]) == 1
    # an irrelevant head changes nothing in either direction (levels would be 0 and 1)
    for d in PLANTED.distractors.values():
        assert abs(den.effects[d]) < 0.05 * abs(den.effects[COUNTER])
        assert abs(noi.effects[d]) < 0.05 * abs(noi.effects[COUNTER])
    if method == "activation":  # levels kept next to the changes
        assert np.allclose(noi.extra["level"], noi.effects + 1.0) and np.allclose(den.extra["level"], den.effects)


@pytest.fixture(scope="module")
def planted_probe_dir(planted_probe, tmp_path_factory):
    d = tmp_path_factory.mktemp("planted-probe")
    planted_probe.save(d)
    return d


@pytest.mark.parametrize("method", ["activation", "attribution"])
def test_patch_command_both_directions(planted_probe_dir, tmp_path, monkeypatch, method, capsys):
    from wordpos.circuit.cli import main

    monkeypatch.setenv("WORDPOS_CACHE", str(tmp_path / "cache"))
    tops = {}
    for direction in ("denoising", "noising"):
        out = tmp_path / direction
        assert main(["patch", "--model", "planted", "--probe", str(planted_probe_dir), "--method", method,
                     "--direction", direction, "--out", str(out), "--n-pairs", "8", "--no-by-pos", "--quiet"]) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["direction"] == direction
        tops[direction] = summary["top_heads"][:2]
        meta = json.loads((out / "effects.json").read_text())
        assert meta["format"] == "wordpos.EffectResult/2" and meta["direction"] == direction
    assert tops["denoising"][0]["head"] == tops["noising"][0]["head"] == f"{COUNTER[0]}.{COUNTER[1]}"
    assert {h["head"] for h in tops["denoising"]} == {h["head"] for h in tops["noising"]}
    for d, n in zip(sorted(tops["denoising"], key=lambda h: h["head"]), sorted(tops["noising"], key=lambda h: h["head"])):
        assert d["effect"] > 0 > n["effect"]
    assert "change" in capsys.readouterr().out
