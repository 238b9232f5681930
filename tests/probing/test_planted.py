"""The planted model's ground truth, asserted on its own: it builds fast and runs unmodified in HF,
TransformerLens and nnsight; its cache rebuilds when broken; the counter counts words (not tokens); the
distractors do what they claim; a probe beats position only through the counter, which reaches the probe
both directly and through the receiver."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from wordpos.probing.models.planted import DIM, MANIFEST, MIRROR, PLANTED, VERSION, build_planted_model, planted_dir

BOS = 50256
PREFIX = ("The United States Declaration of Independence received its first formal public reading, in "
          "Philadelphia.\nWhen")
N_WORDS = 7
FINAL = f"blocks.{PLANTED.n_layers - 1}.hook_resid_post"


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tok():
    from wordpos.probing.models.tokenizers import gpt2_tokenizer

    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The planted model built through the cache (WORDPOS_CACHE → a temporary directory)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WORDPOS_CACHE", str(tmp_path_factory.mktemp("wordpos-cache")))
        yield planted_dir()


@pytest.fixture(scope="module")
def model(built):
    from wordpos.probing import load_model

    return load_model(built, device="cpu")


@pytest.fixture(scope="module")
def prefix_ids(tok):
    ids = [BOS] + tok.encode(PREFIX)
    assert len(ids) == 19
    return ids


@pytest.fixture(scope="module")
def words_by_len(tok):
    """Lowercase frequent words by GPT-2 token count (with a leading space): {1: [...], 2: [...], 3: [...]}."""
    from wordfreq import top_n_list

    words = [w for w in top_n_list("en", 10_000) if w.isascii() and w.isalpha() and w.islower()]
    out: dict[int, list[list[int]]] = {1: [], 2: [], 3: []}
    for w, ids in zip(words, tok([" " + w for w in words])["input_ids"]):
        if len(ids) in out:
            out[len(ids)].append(list(ids))
    assert all(len(v) > 100 for v in out.values())
    return out


def _prompts(prefix_ids, words_by_len, lengths_list, rng):
    """Token ids [n, T] (right-padded with BOS), word-final positions [n, 7], word indices [n, 7]."""
    seqs, finals = [], []
    for lengths in lengths_list:
        ids, fin = list(prefix_ids), []
        for n in lengths:
            pool = words_by_len[n]
            ids += pool[rng.integers(len(pool))]
            fin.append(len(ids) - 1)
        seqs.append(ids)
        finals.append(fin)
    T = max(map(len, seqs))
    toks = torch.tensor([s + [BOS] * (T - len(s)) for s in seqs])
    finals = torch.tensor(finals)
    labels = torch.arange(finals.shape[1]).expand_as(finals)
    return toks, finals, labels


@pytest.fixture(scope="module")
def dataset(prefix_ids, words_by_len):
    """The reference recipe: prefix + 7 random words of 1-3 tokens (uniform); 300 train, 150 test prompts."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 4, size=(450, N_WORDS)).tolist()
    toks, finals, labels = _prompts(prefix_ids, words_by_len, lengths, rng)
    return {"train": (toks[:300], finals[:300], labels[:300]), "test": (toks[300:], finals[300:], labels[300:])}


class _Stop(Exception):
    pass


def _resid_at_finals(model, toks, finals, hooks=()):
    """The final layer's resid_post at word-final tokens, [n·7, d_model] (stops before the unembedding)."""
    store = {}

    def keep(act, hook):
        store["x"] = act.detach()
        raise _Stop

    with torch.no_grad():
        try:
            model.run_with_hooks(toks, fwd_hooks=[*hooks, (FINAL, keep)])
        except _Stop:
            pass
    x = store["x"][torch.arange(len(toks)).unsqueeze(1), finals]  # [n, 7, d_model]
    return x.reshape(-1, x.shape[-1]).numpy()


def _zero_head(layer, head):
    def fn(z, hook):  # hook_z: [batch, pos, head, d_head]
        z = z.clone()
        z[:, :, head] = 0.0
        return z

    return (f"blocks.{layer}.attn.hook_z", fn)


def _zero_features(*names):
    def fn(x, hook):
        x = x.clone()
        for n in names:
            x[..., DIM[n]] = 0.0
            x[..., DIM[n] + MIRROR] = 0.0
        return x

    return (FINAL, fn)


def _probe():
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))


def _position_baseline(train_pos, train_y, test_pos, test_y) -> float:
    """Best absolute-position-only classifier: the most frequent word index at each position."""
    table = {}
    for p in np.unique(train_pos):
        table[p] = np.bincount(train_y[train_pos == p]).argmax()
    pred = np.array([table.get(p, -1) for p in test_pos])
    return float((pred == test_y).mean())


# ------------------------------------------------------------------------------------------------ build
def test_builds_fast_and_runs_unmodified_in_hf_tl_and_nnsight(tmp_path, tok):
    from nnsight import TransformersModel
    from transformers import GPT2LMHeadModel

    from wordpos.probing import load_model

    t0 = time.perf_counter()
    path = build_planted_model(tmp_path / "p")
    assert time.perf_counter() - t0 < 10
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "gpt2" and cfg["vocab_size"] == 50257 and cfg["n_positions"] >= 128
    assert cfg["n_layer"] == PLANTED.n_layers and cfg["n_head"] == PLANTED.n_heads
    assert cfg["resid_pdrop"] == cfg["embd_pdrop"] == cfg["attn_pdrop"] == 0.0
    meta = json.loads((path / MANIFEST).read_text())
    assert meta["version"] == VERSION and meta["ground_truth"]["counter"] == list(PLANTED.counter)
    assert PLANTED.counter != (0, 0)

    toks = torch.tensor([[BOS] + tok.encode(PREFIX + " the dramatisation began, slowly.\nThen it ended")])
    hf = GPT2LMHeadModel.from_pretrained(path).eval()
    bridge = load_model(path, device="cpu")
    with torch.no_grad():
        ref = hf(toks).logits
        assert (bridge(toks) - ref).abs().max() < 1e-4
        lm = TransformersModel(str(path), tokenizer=tok, task="text-generation", dispatch=True)
        with lm.trace(toks):
            out = lm.output.logits.save()
    assert (out - ref).abs().max() < 1e-4


def test_planted_dir_is_cached_and_rebuilt_when_broken(tmp_path, monkeypatch):
    from wordpos.probing import load_model

    monkeypatch.setenv("WORDPOS_CACHE", str(tmp_path))
    path = planted_dir()
    assert path == tmp_path / "planted"
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert planted_dir() == path and (path / "model.safetensors").stat().st_mtime_ns == stamp  # reused
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]

    def breaks(fn):
        fn()
        assert planted_dir() == path
        assert (path / "model.safetensors").stat().st_size > 1e6 and (path / "tokenizer.json").exists()
        meta = json.loads((path / MANIFEST).read_text())
        assert meta["version"] == VERSION

    breaks(lambda: (path / "model.safetensors").write_bytes(b"torn"))
    breaks(lambda: (path / "tokenizer.json").unlink())
    breaks(lambda: (path / "config.json").write_text("{"))
    breaks(lambda: (path / MANIFEST).write_text("not json"))
    breaks(lambda: (path / MANIFEST).write_text(json.dumps({"version": VERSION - 1})))
    model = load_model("planted", device="cpu")
    assert model.cfg.n_layers == PLANTED.n_layers


# ------------------------------------------------------------------------------------------------ counter
def test_counter_attends_to_the_anchor_and_word_starts(model, dataset, tok):
    toks, finals, _ = dataset["test"]
    toks, finals = toks[:32], finals[:32]
    L, h = PLANTED.counter
    with torch.no_grad():
        _, cache = model.run_with_cache(toks)
    pattern = cache[f"blocks.{L}.attn.hook_pattern"][:, h]  # [batch, q, k]
    pieces = np.array(tok.convert_ids_to_tokens(list(range(len(tok)))), dtype=object)
    space = torch.tensor([p.startswith("Ġ") for p in pieces[toks.reshape(-1).numpy()]]).reshape(toks.shape)
    anchor = torch.isin(toks, torch.tensor([13, 11, 198]))  # ".", ",", "\n"
    for i in range(len(toks)):
        for q in finals[i].tolist():
            w = pattern[i, q, : q + 1]
            on = (space[i, : q + 1] | anchor[i, : q + 1])
            assert float(w[on].sum()) > 0.999
            # score 3 on anchors, 1 on word starts: an anchor gets e² times a word start's weight
            ratio = float(w[anchor[i, : q + 1]].mean() / w[space[i, : q + 1]].mean())
            assert ratio == pytest.approx(np.e**2, rel=1e-3)


def test_counter_output_is_monotone_in_words_not_tokens(model, prefix_ids, words_by_len):
    """Prompts whose word lengths differ put different word indices at the same absolute position; the
    counter's output at word-final tokens depends on the word index only, and increases with it."""
    rng = np.random.default_rng(1)
    lengths = [[3] * 7, [1] * 7, [2] * 7, [1, 3, 1, 3, 1, 3, 1], [3, 1, 3, 1, 3, 1, 3], [2, 1, 3, 3, 1, 2, 1]]
    lengths += rng.integers(1, 4, size=(20, N_WORDS)).tolist()
    toks, finals, labels = _prompts(prefix_ids, words_by_len, lengths, rng)
    L = PLANTED.counter[0]
    with torch.no_grad():
        _, cache = model.run_with_cache(toks)
    # the count feature has one writer, the counter head
    count = cache[f"blocks.{L}.hook_resid_post"][..., DIM["count"]]
    out = count[torch.arange(len(toks)).unsqueeze(1), finals]  # [n, 7]
    assert (out[:, 1:] > out[:, :-1] + 0.05).all()  # strictly monotone in the word index
    assert (out - out[0]).abs().max() < 1e-4  # the same for every word-length pattern
    pos = finals.reshape(-1)
    lab = labels.reshape(-1)
    shared = [p for p in pos.unique().tolist() if len(lab[pos == p].unique()) > 1]
    assert len(shared) >= 10  # the same absolute position, different word indices
    # position 24 ends word 1 when words take 3 tokens and word 5 when they take 1
    assert finals[0, 1] == finals[1, 5] == 24
    assert out[1, 5] > out[0, 1]


# ------------------------------------------------------------------------------------------------ distractors
def test_distractors_do_what_they_claim(model, dataset):
    toks = dataset["test"][0][:8]
    with torch.no_grad():
        _, cache = model.run_with_cache(toks)
    T = toks.shape[1]
    Lp, hp = PLANTED.distractors["prev_token"]
    prev = cache[f"blocks.{Lp}.attn.hook_pattern"][:, hp]
    assert (prev[:, torch.arange(1, T), torch.arange(T - 1)] > 0.99).all()
    La, ha = PLANTED.distractors["abs_position"]
    uniform = cache[f"blocks.{La}.attn.hook_pattern"][:, ha]
    assert torch.allclose(uniform[0, T - 1], torch.full((T,), 1.0 / T), atol=1e-6)
    abspos = cache[f"blocks.{La}.hook_resid_post"][0, :, DIM["abspos"]]
    assert np.corrcoef(abspos.numpy(), np.arange(T))[0, 1] > 0.999
    # and it is that head's output: zeroing its z removes the feature
    store = {}
    with torch.no_grad():
        model.run_with_hooks(toks, fwd_hooks=[_zero_head(La, ha), (f"blocks.{La}.hook_resid_post",
                                                                    lambda x, hook: store.setdefault("x", x))])
    assert store["x"][..., DIM["abspos"]].abs().max() < 1e-5
    R = PLANTED.receivers[0]
    recv = cache[f"blocks.{R[0]}.attn.hook_pattern"][:, R[1]]
    assert (torch.diagonal(recv, dim1=-2, dim2=-1) > 0.99).all()


# ------------------------------------------------------------------------------------------------ probe
def test_probe_beats_position_only_through_the_counter(model, dataset):
    tr_toks, tr_fin, tr_y = dataset["train"]
    te_toks, te_fin, te_y = dataset["test"]
    ytr, yte = tr_y.reshape(-1).numpy(), te_y.reshape(-1).numpy()
    base = _position_baseline(tr_fin.reshape(-1).numpy(), ytr, te_fin.reshape(-1).numpy(), yte)

    def fit_score(hooks=()):
        probe = _probe().fit(_resid_at_finals(model, tr_toks, tr_fin, hooks), ytr)
        return probe, probe.score(_resid_at_finals(model, te_toks, te_fin, hooks), yte)

    probe, acc = fit_score()
    assert 0.45 < base < 0.65  # ≈ 0.55 for 7 words of 1-3 tokens
    assert acc > base + 0.3
    counter = _zero_head(*PLANTED.counter)
    fixed = probe.score(_resid_at_finals(model, te_toks, te_fin, [counter]), yte)
    _, refit = fit_score([counter])
    assert fixed < base  # the fitted probe loses what it read beyond position
    assert refit - base < 0.25 * (acc - base)  # a re-fitted probe recovers little of the gain
    # the counter reaches the probe both directly and through the receiver: either path alone suffices
    _, no_receiver = fit_score([_zero_head(*PLANTED.receivers[0])])
    _, no_direct = fit_score([_zero_features("count")])
    _, neither = fit_score([_zero_features("count", "relay")])
    assert no_receiver > acc - 0.02 and no_direct > acc - 0.02
    assert neither - base < 0.25 * (acc - base)
    # distractors carry nothing the probe needs beyond position
    for L, h in PLANTED.distractors.values():
        _, without = fit_score([_zero_head(L, h)])
        assert without > acc - 0.02
