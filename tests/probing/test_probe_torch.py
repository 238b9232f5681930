"""The torch solver of the word-index probe against scikit-learn's: the same optimum on synthetic data,
the same held-out accuracy and predictions on the organism, and the batched all-layers fit against
per-layer fits."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from wordpos.probing import ConfigError, WordIndexProbe
from wordpos.probing.probe import fit_probes


def _blobs(n_classes: int, n: int = 300, d: int = 12, spread: float = 1.2, seed: int = 0):
    """Overlapping Gaussian blobs ("separable-ish"), offset and badly scaled to exercise standardisation."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_classes, d)) * spread
    y = rng.integers(0, n_classes, size=n)
    X = centers[y] + rng.normal(size=(n, d)) + 3.0
    X[:, 0] *= 25
    return X, y


def _sklearn_objective(X: np.ndarray, y: np.ndarray, coef: np.ndarray, intercept: np.ndarray, C: float) -> float:
    """scikit-learn's penalised objective ``C * sum CE + ||W||^2 / 2`` in standardised space, written out
    with numpy (binary problems: one logit column, logits ``[0, z]``)."""
    Z = StandardScaler().fit_transform(X)
    z = Z @ coef.T + intercept
    if z.shape[1] == 1:
        z = np.hstack([np.zeros_like(z), z])
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-C * logp[np.arange(len(y)), y].sum() + 0.5 * (coef ** 2).sum())


@pytest.mark.parametrize("n_classes,C", [(2, 1.0), (4, 1.0), (7, 0.1)])
def test_torch_reaches_sklearns_optimum(n_classes, C):
    X, y = _blobs(n_classes)
    ref = LogisticRegression(C=C, tol=1e-10, max_iter=20000).fit(StandardScaler().fit_transform(X), y)
    probe = WordIndexProbe(C=C, solver="torch", tol=1e-7).fit(X, y)
    f_ref = _sklearn_objective(X, y, ref.coef_, ref.intercept_, C)
    f_ours = _sklearn_objective(X, y, probe.coef_, probe.intercept_, C)
    assert probe.coef_.shape == ref.coef_.shape and probe.intercept_.shape == ref.intercept_.shape
    assert abs(f_ours - f_ref) <= 1e-4 * abs(f_ref)
    assert np.mean(probe.predict(X) == ref.predict(StandardScaler().fit_transform(X))) >= 0.99


def test_torch_probe_estimator_api_and_round_trip(tmp_path):
    X, y = _blobs(4)
    probe = WordIndexProbe(solver="torch", layer=2, model="m").fit(torch.from_numpy(X).float(), y)
    assert probe.get_params()["solver"] == "torch"
    assert probe.predict_proba(X).shape == (len(y), 4)
    # directions in the residual basis reproduce the standardised-space decision function
    ours = probe.logits(torch.from_numpy(X).double()).numpy()
    assert np.allclose(ours, probe.decision_function(X), atol=1e-3)
    probe.save(tmp_path / "p")
    loaded = WordIndexProbe.load(tmp_path / "p")
    assert loaded.solver == "torch" and loaded.layer == 2
    assert np.array_equal(loaded.predict(X), probe.predict(X))
    assert torch.allclose(loaded.directions_, probe.directions_)


def test_batched_fit_equals_per_layer_fits():
    """One optimisation over [layer, d, k] weights gives each layer its own optimum."""
    layers = [_blobs(5, seed=s)[0] for s in range(3)]
    y = _blobs(5, seed=0)[1]
    rng = np.random.default_rng(1)
    layers[1] = layers[0] @ rng.normal(size=(12, 12))  # same labels, other features per "layer"
    layers[2] = layers[0] + rng.normal(size=layers[0].shape) * 2
    batched = fit_probes(torch.from_numpy(np.stack(layers)), y, layers=[0, 1, 2], tol=1e-7)
    for L, X in enumerate(layers):
        ref = LogisticRegression(tol=1e-10, max_iter=20000).fit(StandardScaler().fit_transform(X), y)
        f_ref = _sklearn_objective(X, y, ref.coef_, ref.intercept_, 1.0)
        f_ours = _sklearn_objective(X, y, batched[L].coef_, batched[L].intercept_, 1.0)
        assert batched[L].layer == L
        assert abs(f_ours - f_ref) <= 1e-4 * abs(f_ref)


@pytest.mark.parametrize("n_classes,C", [(2, 1.0), (4, 1.0), (7, 0.1)])
def test_batched_lbfgs_reaches_sklearns_optimum(n_classes, C):
    """The accelerator's optimizer (one L-BFGS per problem, trial steps scored at once), run here on the CPU."""
    X, y = _blobs(n_classes, n=400, d=20)
    ref = LogisticRegression(C=C, tol=1e-10, max_iter=20000).fit(StandardScaler().fit_transform(X), y)
    (probe,) = fit_probes(torch.from_numpy(X)[None], y, C=C, tol=1e-7, optimizer="batched")
    f_ref = _sklearn_objective(X, y, ref.coef_, ref.intercept_, C)
    f_ours = _sklearn_objective(X, y, probe.coef_, probe.intercept_, C)
    assert probe.coef_.shape == ref.coef_.shape and probe.intercept_.shape == ref.intercept_.shape
    assert abs(f_ours - f_ref) <= 1e-6 * abs(f_ref)


def test_batched_lbfgs_solves_each_problem_on_its_own():
    """Stacked problems are not coupled: each comes out as when solved alone (unlike one joint L-BFGS, whose
    shared line search ties them), and the reported iterations are the slowest problem's."""
    from wordpos.probing.probe import batched_lbfgs_logreg

    rng = np.random.default_rng(3)
    X, y = _blobs(5, n=300, d=12)
    Z = StandardScaler().fit_transform(X)
    Zs = torch.from_numpy(np.stack([Z, Z @ rng.normal(size=(12, 12)) * 0.3, Z + rng.normal(size=Z.shape)]))
    yt = torch.from_numpy(y)
    W, b, it, conv = batched_lbfgs_logreg(Zs, yt, 5, 1.0, tol=1e-6)
    alone = [batched_lbfgs_logreg(Zs[i:i + 1], yt, 5, 1.0, tol=1e-6) for i in range(3)]
    assert conv and it == max(a[2] for a in alone) and len({a[2] for a in alone}) > 1
    for i, (Wi, bi, _, _) in enumerate(alone):
        assert torch.allclose(W[i], Wi[0], rtol=0, atol=1e-9) and torch.allclose(b[i], bi[0], rtol=0, atol=1e-9)


def test_batched_lbfgs_past_max_iter_is_not_converged():
    """The solver runs whole blocks of ``history_size`` iterations: a problem that stops only after ``max_iter`` (in
    the last block's overrun) is reported unconverged, with its iteration count; within ``max_iter``, converged."""
    from wordpos.probing.probe import batched_lbfgs_logreg

    X, y = _blobs(5, n=300, d=12)
    Z = torch.from_numpy(StandardScaler().fit_transform(X))[None]
    _, _, needed, conv = batched_lbfgs_logreg(Z, torch.from_numpy(y), 5, 1.0, tol=1e-6)
    assert conv and needed > 5
    _, _, it, conv = batched_lbfgs_logreg(Z, torch.from_numpy(y), 5, 1.0, tol=1e-6, max_iter=needed - 1)
    assert not conv and it > needed - 1
    _, _, it, conv = batched_lbfgs_logreg(Z, torch.from_numpy(y), 5, 1.0, tol=1e-6, max_iter=needed)
    assert conv and it == needed


def _two_loop(g, S, Y, rho, scale, head):
    """The textbook L-BFGS two-loop recursion, pair by pair: slots in ring order, ``head`` the next slot to write
    (so ``head - 1`` holds the newest pair), ``rho = 0`` a slot to skip, ``H_0 = scale · I``."""
    m = S.shape[1]
    order = [(head - 1 - i) % m for i in range(m)]  # newest first
    q, alpha = -g.clone(), {}
    for j in order:
        alpha[j] = rho[:, j] * (S[:, j] * q).sum(-1)
        q = q - alpha[j][:, None] * Y[:, j]
    r = q * scale[:, None]
    for j in reversed(order):
        beta = rho[:, j] * (Y[:, j] * r).sum(-1)
        r = r + (alpha[j] - beta)[:, None] * S[:, j]
    return r


@pytest.mark.parametrize("m", [1, 2, 3, 10, 16, 17])
def test_lbfgs_direction_is_the_two_loop_recursion(m):
    """The batched solver's direction (two nilpotent triangular systems, no loop over the pairs) equals the
    two-loop recursion for every ring position, with skipped slots and a problem with no usable pair."""
    from wordpos.probing.probe import lbfgs_direction, recency_masks

    gen = torch.Generator().manual_seed(m)
    L, F = 4, 30
    S = torch.randn(L, m, F, generator=gen, dtype=torch.float64)
    Y = S + 0.3 * torch.randn(L, m, F, generator=gen, dtype=torch.float64)
    rho = 1 / (S * Y).sum(-1)
    rho[torch.rand(L, m, generator=gen) < 0.3] = 0
    rho[0] = 0  # no usable pair: steepest descent scaled by H_0
    g = torch.randn(L, F, generator=gen, dtype=torch.float64)
    scale = torch.rand(L, generator=gen, dtype=torch.float64) + 0.5
    masks = recency_masks(m)
    for head in range(m):
        ref = _two_loop(g, S, Y, rho, scale, head)
        got = lbfgs_direction(g, S, Y, rho, scale, masks[head])
        assert torch.allclose(got, ref, rtol=1e-12, atol=1e-12 * float(ref.abs().max()))
    assert torch.allclose(got[0], -scale[0] * g[0], rtol=1e-14, atol=0)
    # nearly collinear steps of growing length and y = H s: the triangular systems' entries are of order one and
    # their highest powers matter, so a product stopped one factor early shows
    A = torch.randn(F, F, generator=gen, dtype=torch.float64)
    H = A @ A.T / F + 1e-3 * torch.eye(F, dtype=torch.float64)
    S = torch.randn(L, 1, F, generator=gen, dtype=torch.float64) + 0.05 * torch.randn(L, m, F, generator=gen,
                                                                                        dtype=torch.float64)
    S = S * 2.0 ** torch.arange(m, dtype=torch.float64)[None, :, None]
    Y = S @ H
    rho = 1 / (S * Y).sum(-1)
    for head in range(m):
        ref = _two_loop(g, S, Y, rho, scale, head)
        got = lbfgs_direction(g, S, Y, rho, scale, masks[head])
        assert torch.allclose(got, ref, rtol=1e-9, atol=1e-9 * float(ref.abs().max())), head


def test_solver_errors():
    X, y = _blobs(3)
    with pytest.raises(ConfigError, match="solver"):
        WordIndexProbe(solver="newton").fit(X, y)
    with pytest.raises(ConfigError, match="single class"):
        WordIndexProbe(solver="torch").fit(X, np.zeros(len(y), dtype=int))
    with pytest.raises(ConfigError, match="labels"):
        WordIndexProbe(solver="torch").fit(X, y[:10])
    with pytest.raises(ConfigError, match="n_layers"):
        fit_probes(torch.zeros(10, 3), y[:10])
    with pytest.raises(ConfigError, match="optimizer"):
        fit_probes(torch.from_numpy(X)[None], y, optimizer="newton")


@pytest.fixture(scope="module")
def organism_acts():
    from wordpos.probing import WordIndexDataset, collect_residuals, load_model

    model = load_model("organism")
    data = WordIndexDataset.default(model.tokenizer, n_prompts=1024, seed=0)
    return collect_residuals(model, data, layers="all", progress=False)


@pytest.mark.slow
def test_organism_torch_matches_sklearn_held_out(organism_acts):
    """Held-out-word accuracy within 0.5 point of scikit-learn's and ≥ 98% identical predictions, at
    the organism's best layers (2 and 3)."""
    acts = organism_acts
    for L in (2, 3):
        Xtr, ytr, Xte, yte = acts.train(L), acts.labels["train"], acts.test(L), acts.labels["test"]
        sk = WordIndexProbe(solver="sklearn").fit(Xtr, ytr)
        th = WordIndexProbe(solver="torch").fit(Xtr, ytr)
        assert abs(th.score(Xte, yte) - sk.score(Xte, yte)) <= 0.005
        assert np.mean(th.predict(Xte) == sk.predict(Xte)) >= 0.98


@pytest.mark.slow
def test_organism_sweep_torch_batched_matches_sklearn(organism_acts, monkeypatch):
    """The layer sweep with the torch solver — all layers in one batched fit (forced here, as on an
    accelerator) — against scikit-learn's per-layer sweep: same best layer, accuracies within 0.5 point."""
    from wordpos.probing import evaluation

    monkeypatch.setattr(evaluation, "_layer_groups", lambda layers, *a: [list(layers)])
    ours = evaluation.sweep_layers(organism_acts, solver="torch", shuffled_control="none", progress=False)
    ref = evaluation.sweep_layers(organism_acts, solver="sklearn", shuffled_control="none", progress=False)
    assert ours.best_layer == ref.best_layer
    for L in organism_acts.layers:
        assert abs(ours.results[L].accuracy - ref.results[L].accuracy) <= 0.005
        assert ours.probes[L].layer == L and ours.probes[L].solver == "torch"


@pytest.mark.slow
def test_organism_batched_optimizer_matches_sklearn(organism_acts):
    """The accelerator's optimizer on every organism layer at once (forced on the CPU): held-out accuracy within
    0.5 point of scikit-learn's per layer."""
    acts = organism_acts
    X = torch.stack([torch.as_tensor(acts.train(L)) for L in acts.layers])
    probes = fit_probes(X, acts.labels["train"], layers=list(acts.layers), optimizer="batched")
    for L, probe in zip(acts.layers, probes):
        sk = WordIndexProbe(solver="sklearn").fit(acts.train(L), acts.labels["train"])
        assert probe.layer == L
        assert abs(probe.score(acts.test(L), acts.labels["test"]) - sk.score(acts.test(L), acts.labels["test"])) <= 0.005


@pytest.mark.parametrize("n_classes", [2, 7])
def test_device_decision_path_matches_sklearns(n_classes):
    """Residuals kept on an accelerator are scored there (``WordIndexProbe._torch_decision``, run here on the CPU):
    the same decision values as scikit-learn's host path and the same predictions."""
    X, y = _blobs(n_classes, n=500, d=16)
    probe = WordIndexProbe(solver="torch").fit(X, y)
    ours = probe._torch_decision(torch.from_numpy(X).float()).numpy()
    ref = probe.clf_.decision_function(probe.scaler_.transform(X.astype(np.float32).astype(np.float64)))
    assert np.allclose(ours[:, 0] if n_classes == 2 else ours, ref, rtol=0, atol=1e-9)
    pred = np.asarray(probe.classes_)[(ours[:, 0] > 0).astype(int) if n_classes == 2 else ours.argmax(1)]
    assert np.array_equal(pred, probe.predict(X.astype(np.float32)))


def test_probe_pickles_without_its_device_weight_copy():
    """``logits`` keeps the weights' copy per device and dtype; a pickled probe leaves it out and scores the same."""
    import pickle

    X, y = _blobs(3, n=200, d=8)
    probe = WordIndexProbe(solver="torch").fit(X, y)
    before = probe.logits(torch.from_numpy(X).double())
    assert "_weights_on" in probe.__dict__
    back = pickle.loads(pickle.dumps(probe))
    assert "_weights_on" not in back.__dict__ and "_weights_on" in probe.__dict__
    assert torch.equal(back.logits(torch.from_numpy(X).double()), before)
    probe.directions_.mul_(2)  # an in-place change of the weights is seen by the next call
    assert not torch.allclose(probe.logits(torch.from_numpy(X).double()), before)
