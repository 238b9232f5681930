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


@pytest.mark.parametrize("precondition", [True, False])
@pytest.mark.parametrize("n_classes,C", [(2, 1.0), (4, 1.0), (7, 0.1)])
def test_batched_lbfgs_reaches_sklearns_optimum(n_classes, C, precondition, monkeypatch):
    """The accelerator's optimizer (one L-BFGS per problem, trial steps scored at once), run here on the CPU, with
    and without its preconditioner."""
    import wordpos.probing.probe as probe_mod

    solver = probe_mod.batched_lbfgs_logreg
    monkeypatch.setattr(probe_mod, "batched_lbfgs_logreg",
                        lambda *a, **kw: solver(*a, **kw, precondition=precondition))
    X, y = _blobs(n_classes, n=400, d=20)
    ref = LogisticRegression(C=C, tol=1e-10, max_iter=20000).fit(StandardScaler().fit_transform(X), y)
    (probe,) = fit_probes(torch.from_numpy(X)[None], y, C=C, tol=1e-7, optimizer="batched")
    f_ref = _sklearn_objective(X, y, ref.coef_, ref.intercept_, C)
    f_ours = _sklearn_objective(X, y, probe.coef_, probe.intercept_, C)
    assert probe.coef_.shape == ref.coef_.shape and probe.intercept_.shape == ref.intercept_.shape
    assert abs(f_ours - f_ref) <= 1e-6 * abs(f_ref)


def _correlated(n: int = 600, d: int = 60, seed: int = 0):
    """Features with a power-law spectrum in a random basis (as residual-stream features: a few directions carry
    most of the variance, and every feature mixes them), labels from a direction across the whole spectrum."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    G = rng.normal(size=(n, d))
    X = (G * np.arange(1, d + 1) ** -1.5) @ Q.T
    y = np.digitize(G @ rng.normal(size=d) / np.sqrt(d), [-1.0, 0.0, 1.0])
    return X, y


def test_preconditioned_lbfgs_same_optimum_in_fewer_iterations():
    """On correlated features the preconditioned solver (L-BFGS from H_0 = γ P) stops at scikit-learn's optimum, as
    plain L-BFGS does, in far fewer iterations; with P = I it is plain L-BFGS, iterate for iterate."""
    from wordpos.probing.probe import batched_lbfgs_logreg

    X, y = _correlated()
    Z = torch.from_numpy(StandardScaler().fit_transform(X))[None]
    yt = torch.from_numpy(y)
    ref = LogisticRegression(tol=1e-10, max_iter=20000).fit(Z[0].numpy(), y)
    f_ref = _sklearn_objective(X, y, ref.coef_, ref.intercept_, 1.0)
    fits = {pc: batched_lbfgs_logreg(Z, yt, 4, 1.0, tol=1e-6, precondition=pc) for pc in (False, True)}
    for pc, (W, b, it, conv) in fits.items():
        assert conv
        f = _sklearn_objective(X, y, W[0].T.numpy(), b[0].numpy(), 1.0)
        assert abs(f - f_ref) <= 1e-6 * abs(f_ref), pc
    assert fits[True][2] < 0.5 * fits[False][2], (fits[True][2], fits[False][2])


def test_preconditioner_identity_is_plain_lbfgs(monkeypatch):
    """With ``P = I`` the preconditioned code path takes plain L-BFGS's iterates: same iterations, same weights."""
    import wordpos.probing.probe as probe_mod

    X, y = _blobs(4, n=300, d=12)
    Z = torch.from_numpy(StandardScaler().fit_transform(X))[None]
    W0, b0, it0, _ = probe_mod.batched_lbfgs_logreg(Z, torch.from_numpy(y), 4, 1.0, tol=1e-6, precondition=False)
    monkeypatch.setattr(probe_mod, "logreg_preconditioner",
                        lambda Za, *a: torch.eye(Za.shape[2], dtype=Za.dtype).expand(len(Za), -1, -1).contiguous())
    W1, b1, it1, _ = probe_mod.batched_lbfgs_logreg(Z, torch.from_numpy(y), 4, 1.0, tol=1e-6, precondition=True)
    assert it1 == it0
    assert torch.allclose(W1, W0, rtol=0, atol=1e-10) and torch.allclose(b1, b0, rtol=0, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_lbfgs_zero_gradient_start(dtype):
    """A problem whose gradient is zero at the start (no information, balanced labels) stays at zero weights in
    either precision, beside one that moves: no 0/0 from a fresh step's scale."""
    from wordpos.probing.probe import batched_lbfgs_logreg

    y = torch.arange(64) % 2
    Z = torch.zeros(2, 64, 3, dtype=dtype)
    Z[1, :, 0] = (2.0 * y - 1) + 0.5 * torch.randn(64, generator=torch.Generator().manual_seed(0), dtype=dtype)
    W, b, it, conv = batched_lbfgs_logreg(Z, y, 2, 1.0, precondition=True)
    assert conv and torch.isfinite(W).all() and torch.isfinite(b).all()
    assert torch.equal(W[0], torch.zeros_like(W[0])) and float(W[1].abs().max()) > 0.1


def _penalised_loss(theta, Za, y, n_classes, reg):
    """The batched solver's objective written out independently: mean cross-entropy of the logits ``Za θ``
    (binary: ``[0, z]``) plus ``reg ||W||²`` (intercept, the last row, unpenalised)."""
    z = Za @ theta
    if theta.shape[1] == 1:
        z = torch.cat([torch.zeros_like(z), z], dim=1)
    return -torch.log_softmax(z, 1)[torch.arange(len(y)), y].mean() + reg * (theta[:-1] ** 2).sum()


@pytest.mark.parametrize("n_classes", [2, 4])
def test_logreg_preconditioner_inverts_the_hessian_at_zero(n_classes):
    """``P`` is the inverse Hessian of the objective at θ = 0 (autograd's): exactly for a binary problem; on the
    directions that change the class probabilities (class contrasts) for several classes."""
    from wordpos.probing.probe import logreg_preconditioner

    X, y = _blobs(n_classes, n=80, d=6)
    Z = torch.from_numpy(StandardScaler().fit_transform(X))
    Za = torch.cat([Z, torch.ones(len(Z), 1, dtype=Z.dtype)], 1)
    reg, k = 0.05, 1 if n_classes == 2 else n_classes
    pen = torch.ones(7, 1, dtype=Z.dtype)
    pen[-1] = 0
    P = logreg_preconditioner(Za[None], pen, reg, 0.25 if k == 1 else 1.0 / n_classes)[0]
    H = torch.autograd.functional.hessian(
        lambda t: _penalised_loss(t.view(7, k), Za, torch.from_numpy(y), n_classes, reg),
        torch.zeros(7 * k, dtype=Z.dtype))  # [(feature, class), (feature, class)]
    if k == 1:
        assert torch.allclose(P, torch.linalg.inv(H), rtol=1e-10, atol=1e-12)
        return
    H = H.view(7, k, 7, k)
    v = torch.tensor([1.0, -1.0, 0.0, 0.0], dtype=Z.dtype)  # a class contrast
    u = torch.randn(7, dtype=Z.dtype, generator=torch.Generator().manual_seed(0))
    Hvu = torch.einsum("aibj,b,j->ai", H, u, v)  # H (u ⊗ v)
    assert torch.allclose(Hvu, torch.outer(torch.linalg.solve(P, u), v), rtol=1e-10, atol=1e-12)


def test_logreg_preconditioner_falls_back_to_identity():
    """Without a penalty, duplicated features make the matrix singular: that problem gets ``P = I`` (plain
    L-BFGS), the other its inverse; nothing raises."""
    from wordpos.probing.probe import logreg_preconditioner

    Z = torch.randn(2, 50, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    Z[0, :, 1] = Z[0, :, 0]
    Za = torch.cat([Z, torch.ones(2, 50, 1, dtype=Z.dtype)], 2)
    pen = torch.ones(5, 1, dtype=Z.dtype)
    P = logreg_preconditioner(Za, pen, 0.0, 0.25)
    assert torch.equal(P[0], torch.eye(5, dtype=Z.dtype))
    assert torch.allclose(P[1], torch.linalg.inv(0.25 * Za[1].T @ Za[1] / 50), rtol=1e-10)


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


@pytest.mark.parametrize("precondition", [True, False])
@pytest.mark.parametrize("history_size,max_iter", [(20, 2000), (20, 7), (3, 2000), (3, 8), (1, 50), (5, 1)])
def test_batched_lbfgs_recorded_path_equals_eager(monkeypatch, history_size, max_iter, precondition):
    """The CUDA-graph path's bookkeeping, on the CPU: one iteration run for real, then replays of a recording of it
    (here a stand-in that runs the iteration, as a replay does), counted in blocks of ``history_size`` from there:
    the same weights, iteration count and convergence flag as the eager path, whether ``max_iter`` binds or not."""
    import wordpos.probing.probe as probe_mod

    X, y = _blobs(5, n=300, d=12)
    Z = torch.from_numpy(np.stack([StandardScaler().fit_transform(X), StandardScaler().fit_transform(X[:, ::-1] ** 2)]))
    yt = torch.from_numpy(y)
    kw = dict(tol=1e-6, history_size=history_size, max_iter=max_iter, precondition=precondition)
    eager = probe_mod.batched_lbfgs_logreg(Z, yt, 5, 1.0, cuda_graph=False, **kw)
    recorded = []

    def run_then_record(fn, device):
        fn()  # the real first run; the recording itself runs nothing
        recorded.append(fn)
        return fn

    monkeypatch.setattr(probe_mod, "_graphs_on", lambda device: True)
    monkeypatch.setattr(probe_mod, "_run_then_record", run_then_record)
    graphed = probe_mod.batched_lbfgs_logreg(Z, yt, 5, 1.0, **kw)
    assert len(recorded) == (1 if max_iter > 1 else 0)
    assert graphed[2:] == eager[2:]
    assert torch.equal(graphed[0], eager[0]) and torch.equal(graphed[1], eager[1])


def _two_loop(g, S, Y, rho, scale, head, P=None):
    """The textbook L-BFGS two-loop recursion, pair by pair: slots in ring order, ``head`` the next slot to write
    (so ``head - 1`` holds the newest pair), ``rho = 0`` a slot to skip, ``H_0 = scale · I`` (``scale · P``)."""
    m = S.shape[1]
    order = [(head - 1 - i) % m for i in range(m)]  # newest first
    q, alpha = -g.clone(), {}
    for j in order:
        alpha[j] = rho[:, j] * (S[:, j] * q).sum(-1)
        q = q - alpha[j][:, None] * Y[:, j]
    r = q * scale[:, None] if P is None else (P @ q[..., None])[..., 0] * scale[:, None]
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
    # from H_0 = scale · P (a preconditioner, given as P g and the pairs' P y)
    B = torch.randn(L, F, F, generator=gen, dtype=torch.float64)
    P = B @ B.transpose(1, 2) / F + 0.1 * torch.eye(F, dtype=torch.float64)
    Pg, PY = (P @ g[..., None])[..., 0], Y @ P.transpose(1, 2)
    for head in range(m):
        ref = _two_loop(g, S, Y, rho, scale, head, P)
        got = lbfgs_direction(g, S, Y, rho, scale, masks[head], Pg, PY)
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
