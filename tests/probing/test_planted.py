"""The planted model's ground truth, asserted: a counter that counts words, distractors that do what they
claim, a probe that must beat position, and a gain that disappears with the counter."""

import time

import numpy as np
import torch

from patching import ablate_heads
from probing import collect_residuals, hooks
from probing.baselines import PositionBaseline
from probing.planted import PLANTED, build_planted_model, planted_dir


def test_builds_fast_and_matches_hf(tmp_path, gpt2_tok):
    from transformers import GPT2LMHeadModel

    from probing import load_model

    t0 = time.perf_counter()
    build_planted_model(tmp_path / "p")
    assert time.perf_counter() - t0 < 10
    bridge = load_model(tmp_path / "p", device="cpu")
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "p").eval()
    toks = torch.tensor([[50256] + gpt2_tok.encode("Hello there.\nWhen the dramatisation began")])
    with torch.no_grad():
        assert (bridge(toks) - hf(toks).logits).abs().max() < 1e-4


def test_cache_is_rebuilt_when_partial(tmp_path, monkeypatch):
    monkeypatch.setenv("WORDPOS_CACHE", str(tmp_path))
    path = planted_dir()
    (path / "model.safetensors").write_bytes(b"torn")
    assert planted_dir() == path and (path / "model.safetensors").stat().st_size > 1e6


def test_counter_counts_words_not_tokens(planted_model, planted_data):
    ps = planted_data.test
    with torch.no_grad():
        _, cache = planted_model.run_with_cache(ps.tokens[:64])
    count = cache[hooks.resid(0)][..., 4]  # the counter's output feature
    for i in range(64):
        c = count[i, ps.word_last[i]]
        assert (c[1:] > c[:-1]).all()  # monotone in the word index
    # same absolute position, different word index → different count, ordered by index
    pos, lab = ps.word_last[:64].reshape(-1), ps.word_labels[:64].reshape(-1)
    vals = count[torch.arange(64).repeat_interleave(7), pos]
    for p in pos.unique():
        sel = pos == p
        if len(lab[sel].unique()) > 1:
            by = {int(k): float(vals[sel][lab[sel] == k].mean()) for k in lab[sel].unique()}
            ks = sorted(by)
            assert all(by[a] < by[b] for a, b in zip(ks, ks[1:]))
    pattern = cache[hooks.attn_pattern(0)][0, PLANTED.counter[1]]
    q = int(ps.word_last[0, -1])
    toks = ps.tokens[0, : q + 1].tolist()
    anchors = [j for j, t in enumerate(toks) if t in (13, 11, 198)]
    spaces = [j for j, t in enumerate(toks) if planted_model.tokenizer.convert_ids_to_tokens(t).startswith("Ġ")]
    assert float(pattern[q, anchors + spaces].sum()) > 0.999


def test_distractors_do_what_they_claim(planted_model, planted_data):
    ps = planted_data.test
    with torch.no_grad():
        _, cache = planted_model.run_with_cache(ps.tokens[:8])
    prev = cache[hooks.attn_pattern(0)][:, PLANTED.distractors["prev_token"][1]]
    T = prev.shape[-1]
    assert (prev[:, torch.arange(1, T), torch.arange(T - 1)] > 0.99).all()
    n = int(ps.lengths[0])  # padding is BOS, which this head counts
    abspos = cache[hooks.resid(0)][0, :n, 5]
    assert np.corrcoef(abspos.numpy(), 1 / (np.arange(n) + 1))[0, 1] > 0.999


def test_probe_beats_position_and_the_counter_carries_the_gain(planted_model, planted_data, planted_probe):
    acts = collect_residuals(planted_model, planted_data, layers=[1], splits=("train", "test"), progress=False)
    acc = planted_probe.score(acts.test(1), acts.labels["test"])
    base = PositionBaseline().fit(acts.abs_pos["train"], acts.labels["train"]).score(acts.abs_pos["test"],
                                                                                     acts.labels["test"])
    assert acc > base + 0.3
    counter = f"{PLANTED.counter[0]}.{PLANTED.counter[1]}"
    res = ablate_heads(planted_model, planted_probe, planted_data, counter, method="zero", progress=False)
    assert res.accuracy <= base  # the probe loses everything it read beyond position
    assert res.refit_accuracy - base < 0.35 * (acc - base)  # a re-fitted probe recovers little of the gain
    distractor = "{}.{}".format(*PLANTED.distractors["abs_position"])
    other = ablate_heads(planted_model, planted_probe, planted_data, distractor, method="zero", progress=False)
    assert other.refit_accuracy > acc - 0.02
