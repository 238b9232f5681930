"""The probe's evaluation against scikit-learn's own estimators and metrics: the host decision path bit for bit,
and every number of a layer's result as scikit-learn and a plain loop compute it."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, confusion_matrix

from wordpos.probing import ConfigError, WordIndexProbe
from wordpos.probing.activations import Residuals
from wordpos.probing.baselines import PositionBaseline
from wordpos.probing.evaluation import evaluate_layer, sweep_layers


def _blobs(n_classes: int, n: int = 300, d: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    X = rng.normal(size=(n_classes, d))[y] * 1.5 + rng.normal(size=(n, d)) + 3.0
    X[:, 1] *= 25
    return X.astype(np.float32), y


@pytest.mark.parametrize("solver", ["sklearn", "torch"])
@pytest.mark.parametrize("n_classes,standardize", [(2, True), (3, False), (7, True)])
def test_host_decision_is_scikit_learns_bit_for_bit(solver, n_classes, standardize):
    X, y = _blobs(n_classes)
    probe = WordIndexProbe(solver=solver, standardize=standardize).fit(X, y)
    Xt, yt = _blobs(n_classes, n=200, seed=1)
    scaler, clf = probe.scaler_, probe.clf_
    ref = clf.decision_function(scaler.transform(Xt.astype(np.float64)))
    assert np.array_equal(probe.decision_function(Xt), ref)
    assert np.array_equal(probe.decision_function(torch.from_numpy(Xt)), ref)  # a host tensor: the same path
    ref_pred = clf.predict(scaler.transform(Xt.astype(np.float64)))
    assert np.array_equal(probe.predict(Xt), ref_pred)
    assert probe.score(Xt, yt) == accuracy_score(yt, ref_pred)
    w = np.random.default_rng(2).random(len(yt))
    assert probe.score(Xt, yt, sample_weight=w) == pytest.approx(accuracy_score(yt, ref_pred, sample_weight=w),
                                                                 abs=1e-15)


def test_host_decision_refuses_bad_input():
    X, y = _blobs(3)
    probe = WordIndexProbe().fit(X, y)
    bad = X.copy()
    bad[4, 2] = np.nan
    with pytest.raises(ConfigError, match="NaN or inf"):
        probe.predict(bad)
    with pytest.raises(ConfigError, match="shape"):
        probe.predict(X[:, :5])
    with pytest.raises(ConfigError, match="labels"):
        probe.score(X, y[:10])
    with pytest.raises(ConfigError, match="0 samples"):
        probe.predict(X[:0])
    with pytest.raises(ConfigError, match="word indices"):
        probe.score(X, y + 0.5)
    with pytest.raises(ConfigError, match="word indices"):
        probe.score(X, y.astype(str))
    assert probe.score(X, y.astype(float)) == probe.score(X, y)  # integral floats are word indices
    with pytest.raises(ConfigError, match="sample_weight"):
        probe.score(X, y, sample_weight=np.ones(5))
    with pytest.raises(ConfigError, match="sample_weight"):
        probe.score(X, y, sample_weight=np.zeros(len(y)))


def _residuals(seed: int = 0, n_layers: int = 3, d: int = 10) -> Residuals:
    """Word indices 0-6 at positions that overlap between indices, with a signal that grows with the layer."""
    rng = np.random.default_rng(seed)
    data, labels, abs_pos, pidx = {}, {}, {}, {}
    for split, n in (("train", 700), ("val", 140), ("test", 350)):
        y = rng.integers(0, 7, n)
        X = rng.normal(size=(n, n_layers, d))
        X[:, :, 0] += y[:, None] * np.arange(n_layers)[None, :] * 0.4
        data[split], labels[split] = X.astype(np.float32), y
        abs_pos[split], pidx[split] = 19 + y + rng.integers(0, 8, n), np.arange(n) // 7
    return Residuals(layers=list(range(n_layers)), kind="resid_post", positions="last", data=data, labels=labels,
                     abs_pos=abs_pos, prompt_idx=pidx, model_name="synthetic")


def _reference(r: Residuals, layer: int, probe: WordIndexProbe) -> dict:
    """Every number of a layer's result from scikit-learn's estimators and metrics and plain loops."""
    to64 = lambda X: probe.scaler_.transform(np.asarray(X, np.float64))  # noqa: E731
    yte, ytr = r.labels["test"], r.labels["train"]
    pred = probe.clf_.predict(to64(r.test(layer)))
    base = PositionBaseline().fit(r.abs_pos["train"], ytr)
    base_pred = base.predict(r.abs_pos["test"])

    def per(p, groups):
        out = {}
        for g in sorted(set(groups.tolist())):
            sel = [i for i in range(len(groups)) if groups[i] == g]
            out[g] = sum(p[i] == yte[i] for i in sel) / len(sel)
        return out

    return dict(
        accuracy=accuracy_score(yte, pred),
        val_accuracy=accuracy_score(r.labels["val"], probe.clf_.predict(to64(r.val(layer)))),
        train_accuracy=accuracy_score(ytr, probe.clf_.predict(to64(r.train(layer)))),
        baseline_abs_pos_accuracy=base.score(r.abs_pos["test"], yte),
        per_word_accuracy=per(pred, yte), baseline_per_word_accuracy=per(base_pred, yte),
        per_position_accuracy=per(pred, r.abs_pos["test"]),
        confusion=confusion_matrix(yte, pred, labels=np.unique(np.concatenate([ytr, yte]))).tolist(),
        n_train=len(ytr), n_test=len(yte))


def _assert_sweep_is_reference(r: Residuals, sweep) -> None:
    """Every layer's result equals :func:`_reference`'s (scikit-learn's metrics and plain loops)."""
    for L in r.layers:
        got = sweep.results[L].to_dict()
        for key, value in _reference(r, L, sweep.probes[L]).items():
            if isinstance(value, dict):
                assert got[key].keys() == value.keys(), key
                assert all(got[key][k] == pytest.approx(v, abs=1e-15) for k, v in value.items()), key
            elif isinstance(value, list):
                assert got[key] == value, key
            else:
                assert got[key] == pytest.approx(value, abs=1e-15), key


@pytest.mark.parametrize("solver", ["sklearn", "torch"])
def test_sweep_results_equal_scikit_learns_metrics(solver):
    r = _residuals()
    sweep = sweep_layers(r, solver=solver, shuffled_control="best", progress=False)
    _assert_sweep_is_reference(r, sweep)
    assert sweep.results[2].accuracy > sweep.results[0].accuracy + 0.1  # the signal grows with the layer
    best = sweep.best_layer
    # the shuffled-label control: a probe fitted on permuted labels, scored by scikit-learn
    perm = np.random.default_rng(0).permutation(r.labels["train"])
    ctrl = WordIndexProbe(solver=solver, layer=best, site="resid_post", model="synthetic").fit(r.train(best), perm)
    ref = accuracy_score(r.labels["test"], ctrl.clf_.predict(ctrl.scaler_.transform(np.asarray(r.test(best),
                                                                                                np.float64))))
    assert sweep.results[best].shuffled_label_accuracy == pytest.approx(ref, abs=1e-15)
    assert all(sweep.results[L].shuffled_label_accuracy is None for L in r.layers if L != best)


def test_evaluate_layer_refuses_a_baseline_of_other_residuals():
    r = _residuals(seed=4)
    with pytest.raises(ConfigError, match="baseline_pred"):
        evaluate_layer(r, 0, shuffled_control=False, solver="sklearn", baseline_pred=np.zeros(3, dtype=int))


def test_evaluate_layer_alone_equals_the_sweeps_layer():
    """``evaluate_layer`` without the sweep's shared baseline predictions gives the same result."""
    r = _residuals(seed=3)
    sweep = sweep_layers(r, solver="sklearn", shuffled_control="none", progress=False)
    alone, _ = evaluate_layer(r, 1, sweep.probes[1], shuffled_control=False, solver="sklearn")
    assert alone == sweep.results[1]


def test_sweep_times_its_fits_evaluation_and_control_apart(monkeypatch):
    """``ProbeSweep.timings`` charges each part its own seconds (a fake clock: the layer fits take 100, each layer's
    evaluation 1, the shuffled-label control's re-evaluation 10), so the benchmark can say where the stage goes."""
    from wordpos.probing import evaluation

    clock = [0.0]
    real_fit, real_eval = evaluation.fit_layers, evaluation.evaluate_layer

    def fit_layers(*a, **kw):
        clock[0] += 100
        return real_fit(*a, **kw)

    def evaluate_layer(*a, shuffled_control=False, **kw):
        clock[0] += 10 if shuffled_control else 1
        return real_eval(*a, shuffled_control=shuffled_control, **kw)

    monkeypatch.setattr(evaluation, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(evaluation, "fit_layers", fit_layers)
    monkeypatch.setattr(evaluation, "evaluate_layer", evaluate_layer)
    r = _residuals()
    sweep = sweep_layers(r, solver="torch", shuffled_control="best", progress=False)
    assert sweep.timings == {"fit_s": 100, "evaluate_s": len(r.layers), "shuffled_s": 10}


@pytest.mark.parametrize("seed", range(4))
def test_confusion_counts_is_scikit_learns(seed):
    """The sweep's confusion matrix equals scikit-learn's ``confusion_matrix`` with ``labels``: unsorted and
    missing labels, classes never predicted, samples whose label is not listed (left out), an empty input."""
    from wordpos.probing.evaluation import confusion_counts

    rng = np.random.default_rng(seed)
    y = rng.integers(0, 7, size=200)
    pred = np.where(rng.random(200) < 0.6, y, rng.integers(0, 9, size=200))  # 7, 8: labels outside the list
    for labels in (np.arange(7), np.array([3, 0, 6, 1, 2, 5, 4]), np.array([0, 2, 4, 6]), np.arange(10)):
        assert np.array_equal(confusion_counts(y, pred, labels), confusion_matrix(y, pred, labels=labels))
    assert np.array_equal(confusion_counts(y[:0], pred[:0], np.arange(3)), np.zeros((3, 3), int))


def _on_tensors(r: Residuals) -> Residuals:
    """The same residuals with every split as a tensor (as kept on a device by ``collect_residuals``)."""
    data = {k: torch.from_numpy(v.copy()) for k, v in r.data.items()}
    return Residuals(r.layers, r.kind, r.positions, data, r.labels, r.abs_pos, r.prompt_idx, r.model_name)


@pytest.mark.parametrize("n_classes", [2, 7])
@pytest.mark.parametrize("standardize", [True, False])
def test_layer_predictions_are_each_probes(n_classes, standardize):
    """The batched predictions of every layer on every split equal each probe's own ``predict``, in chunks of
    layers too; host arrays, or probes of different classes, give None (the sweep scores layer by layer)."""
    from wordpos.probing.evaluation import fit_layers, layer_predictions

    r = _residuals(n_layers=4)
    for split in r.labels:
        r.labels[split] = r.labels[split] % n_classes
    probes = fit_layers(r, r.layers, solver="torch", standardize=standardize)
    t = _on_tensors(r)
    for max_bytes in (1 << 28, 1):  # every layer at once; one layer per block
        got = layer_predictions(t, probes, max_bytes=max_bytes)
        for L, probe in probes.items():
            for split in ("test", "val", "train"):
                assert np.array_equal(got[L][split], probe.predict(r.get(split, L))), (L, split)
    assert layer_predictions(r, probes) is None
    other = WordIndexProbe(solver="torch").fit(r.train(0), (r.labels["train"] + 1) % n_classes + 10)
    assert layer_predictions(t, {**probes, 0: other}) is None


@pytest.mark.parametrize("shuffled", ["none", "best"])
def test_sweep_on_tensors_uses_batched_predictions(monkeypatch, shuffled):
    """A sweep over residuals kept as tensors reads its predictions from the batched products (no per-layer
    ``predict`` of the fitted probes; the shuffled control's own probe predicts) and gives every number
    scikit-learn's metrics give (the reference of the host sweep)."""
    r = _residuals()
    callers = []  # the probes whose predict ran
    predict = WordIndexProbe.predict
    monkeypatch.setattr(WordIndexProbe, "predict", lambda self, X: callers.append(self) or predict(self, X))
    sweep = sweep_layers(_on_tensors(r), solver="torch", shuffled_control=shuffled, progress=False)
    assert not any(p is q for p in callers for q in sweep.probes.values())
    if shuffled == "best":
        assert sweep.results[sweep.best_layer].shuffled_label_accuracy is not None
    _assert_sweep_is_reference(r, sweep)


def test_layer_predictions_refuse_bad_input():
    """The batched path refuses what the host path refuses (NaN residuals, an empty split), probes of layers the
    residuals lack, and predictions of the wrong length, each with one clear error."""
    from wordpos.probing.evaluation import fit_layers, layer_predictions

    r = _residuals(n_layers=2)
    probes = fit_layers(r, r.layers, solver="torch")
    bad = _on_tensors(r)
    bad.data["val"][3, 1, 2] = float("nan")
    with pytest.raises(ConfigError, match="NaN or inf"):
        layer_predictions(bad, probes)
    empty = _on_tensors(r)
    empty.data["val"] = empty.data["val"][:0]
    with pytest.raises(ConfigError, match="0 samples"):
        layer_predictions(empty, probes)
    with pytest.raises(ConfigError, match="do not hold"):
        layer_predictions(_on_tensors(r), {**probes, 5: probes[0]})
    preds = layer_predictions(_on_tensors(r), probes)[0]
    with pytest.raises(ConfigError, match="predictions"):
        evaluate_layer(r, 0, probes[0], shuffled_control=False, predictions={**preds, "train": preds["train"][:1]})


def test_fit_layers_fits_where_the_residuals_are_kept(monkeypatch):
    """Residuals kept as tensors are fitted on their own device, not on a CUDA device that merely exists (which
    would copy them across); a device this machine lacks is refused with what to pass."""
    from wordpos.probing import evaluation
    from wordpos.probing.evaluation import fit_layers

    r = _on_tensors(_residuals(n_layers=2))
    seen = []
    real = evaluation.fit_probes
    monkeypatch.setattr(evaluation, "fit_probes", lambda X, y, **kw: seen.append(kw["device"]) or real(X, y, **kw))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU "present": the residuals stay the guide
    fit_layers(r, r.layers, solver="torch")
    assert seen and all(torch.device(d).type == "cpu" for d in seen)
    monkeypatch.undo()
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            fit_layers(r, r.layers, solver="torch", device="cuda")
