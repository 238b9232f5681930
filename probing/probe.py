"""The word-index probe: multinomial logistic regression on residual vectors, as a scikit-learn estimator.

Its learned directions are exposed in the model's own residual basis (standardisation folded back in),
so patching code can compute probe logits inside a forward pass as ``resid @ directions_.T + bias_``
and differentiate through them.

Two solvers give the same optimum: ``"sklearn"`` (scikit-learn's L-BFGS on the host) and ``"torch"``
(L-BFGS in torch, on the data's device). The torch solver fits every layer at once (:func:`fit_probes`),
which is what a layer sweep uses: on the CPU with torch's LBFGS over a stacked ``[n_layers, d_model,
n_classes]`` weight tensor (:func:`lbfgs_logreg`), on an accelerator with one L-BFGS per layer advanced in
batched ops and replayed as a CUDA graph (:func:`batched_lbfgs_logreg`).
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float, Int
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted
from torch import Tensor

from wordpos.probing.errors import ConfigError, CorruptFileError

ArrayLike = np.ndarray | Tensor
SOLVERS = ("torch", "sklearn")
OPTIMIZERS = ("auto", "joint", "batched")  # the torch solver's L-BFGS variants (fit_probes)
DEFAULT_SOLVER = "torch"  # held-out accuracy within 0.5 point of scikit-learn's (organism, SmolLM2; see tests)
NONFINITE_RESIDUALS = ("the residual vectors contain NaN or inf; check the model's dtype (a float16 overflow?) or "
                       "collect them again in float32.")


def decision_index(d: np.ndarray | Tensor) -> np.ndarray | Tensor:
    """The class index each row of decision values ``[..., k]`` predicts, by scikit-learn's rule: argmax, or
    decision > 0 for two classes (``k = 1``). For numpy arrays and torch tensors alike."""
    return (d[..., 0] > 0) * 1 if d.shape[-1] == 1 else d.argmax(-1)


def _np(x: ArrayLike) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _int_labels(y: ArrayLike) -> np.ndarray:
    """``y`` as int64 word indices; labels that are not whole numbers are refused (a cast would truncate them)."""
    raw = np.asarray(_np(y))
    if raw.ndim == 2 and raw.shape[1] == 1:  # a column vector of labels (scikit-learn takes it too)
        raw = raw[:, 0]
    if raw.dtype.kind not in "iub":
        if raw.dtype.kind != "f" or not np.all(np.isfinite(raw)) or not np.all(raw == np.round(raw)):
            raise ConfigError(f"y must hold integer word indices (0, 1, 2, ...), got {raw.dtype} values such as "
                              f"{raw.ravel()[:3].tolist()}; pass the dataset's labels (e.g. acts.labels['train']).")
    return raw.astype(np.int64)


def check_C(C: float) -> None:
    """The probe's ``C`` (inverse regularisation strength, as scikit-learn's): a positive finite number."""
    if not (isinstance(C, numbers.Real) and np.isfinite(C) and C > 0):
        raise ConfigError(f"C (the inverse regularisation strength, as scikit-learn's) must be a positive number, got "
                          f"{C!r}; the default is 1.0.")


def _check_params(C: float, max_iter: int, model: Any = None) -> None:
    """The fit's settings, checked before any work: a non-positive ``C`` or no iterations fit nothing; ``model``
    is the model's name (a loaded model there would be stored, and written, as the probe's identity)."""
    if model is not None and not isinstance(model, str):
        raise ConfigError(f"model= names the model the probe reads (a string such as acts.model_name), not the "
                          f"model itself (got a {type(model).__name__}): WordIndexProbe(layer=L, "
                          "model=acts.model_name).")
    check_C(C)
    if not isinstance(max_iter, numbers.Integral) or max_iter < 1:
        raise ConfigError(f"max_iter must be a positive integer, got {max_iter!r}.")


def _check_xy(X_shape: tuple[int, ...], y: np.ndarray) -> None:
    if y.ndim != 1:
        raise ConfigError(f"y must be one word index per sample ([n_samples]), got shape {tuple(y.shape)}.")
    if len(X_shape) != 2:
        raise ConfigError(f"X must be [n_samples, d_model], got shape {tuple(X_shape)}.")
    if X_shape[0] != len(y):
        raise ConfigError(f"X has {X_shape[0]} samples but y has {len(y)} labels; pass matching arrays.")
    if len(np.unique(y)) < 2:
        raise ConfigError("y has a single class; the probe needs at least two word indices.")


def _resolve_device(device: str | torch.device | None, X: ArrayLike) -> torch.device:
    """The fit's device: ``device`` if given, else the data's (a tensor's device; host arrays: CPU)."""
    if device is not None:
        return torch.device(device)
    return X.device if isinstance(X, Tensor) else torch.device("cpu")


def _torch_standardize(X: Float[Tensor, "layer sample d"], standardize: bool
                       ) -> tuple[Float[Tensor, "layer d"], Float[Tensor, "layer d"]]:
    """Per-layer mean and scale exactly as :class:`~sklearn.preprocessing.StandardScaler` computes them
    (population variance; constant features get scale 1)."""
    L, n, d = X.shape
    if not standardize:
        return X.new_zeros(L, d), X.new_ones(L, d)
    mean = X.mean(dim=1)
    var = ((X - mean[:, None]) ** 2).mean(dim=1)
    eps = torch.finfo(X.dtype).eps
    constant = var <= n * eps * var + (n * mean * eps) ** 2
    scale = torch.where(constant, torch.ones_like(var), var.sqrt())
    return mean, scale


def lbfgs_logreg(Z: Float[Tensor, "layer sample d"], y: Int[Tensor, "sample"], n_classes: int, C: float, *,
                 max_iter: int = 2000, tol: float = 1e-4, history_size: int = 20
                 ) -> tuple[Float[Tensor, "layer d k"], Float[Tensor, "layer k"], int, bool]:
    """Minimise, for every layer at once, scikit-learn's L2 multinomial logistic loss
    ``sum_i CE(z_i W + b, y_i) + ||W||^2 / (2C)`` (intercept unpenalised), divided by ``n`` for conditioning.

    The layers' problems are independent, so their sum is minimised by one L-BFGS (strong-Wolfe line
    search) over the stacked ``[layer, d, k]`` weights. Two classes use one logit column (``k = 1``:
    logits ``[0, z]``, scikit-learn's binary parameterisation). Stops, like scikit-learn's L-BFGS, when every
    entry of the (``1/n``-scaled) gradient is below ``tol``, or when the loss stops changing. The loss and
    its gradient are computed by hand (two matmuls per evaluation, no autograd graph).
    Returns ``W, b, n_iter, converged``.
    """
    L, n, d = Z.shape
    k = 1 if n_classes == 2 else n_classes
    W = torch.zeros(L, d, k, dtype=Z.dtype, device=Z.device)
    b = torch.zeros(L, k, dtype=Z.dtype, device=Z.device)
    reg = 1.0 / (2.0 * C * n)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, max_eval=int(max_iter * 1.25),
                            tolerance_grad=tol, tolerance_change=float(torch.finfo(Z.dtype).eps),
                            history_size=history_size, line_search_fn="strong_wolfe")

    onehot = torch.nn.functional.one_hot(y.to(Z.device).long(), n_classes).to(Z.dtype)  # [sample, classes]
    Zt = Z.transpose(1, 2).contiguous()  # [layer, d, sample]: the gradient matmul runs on a contiguous operand

    @torch.no_grad()
    def closure() -> Tensor:
        # loss and gradient by hand: two matmuls per evaluation, no autograd graph
        logits = torch.baddbmm(b[:, None, :], Z, W)  # [layer, sample, k]
        if k == 1:
            logits = torch.cat([torch.zeros_like(logits), logits], dim=-1)
        logp = torch.log_softmax(logits, dim=-1)
        loss = -(logp * onehot).sum() / n + reg * (W * W).sum()
        G = (logp.exp() - onehot) / n  # d loss / d logits
        if k == 1:
            G = G[..., 1:]
        W.grad = torch.bmm(Zt, G) + 2 * reg * W
        b.grad = G.sum(dim=1)
        return loss

    opt.step(closure)
    state = opt.state[opt._params[0]]
    n_iter = int(state.get("n_iter", 0))
    with torch.no_grad():
        grad = torch.cat([W.grad.reshape(-1), b.grad.reshape(-1)]).abs().max().item() if W.grad is not None else 0.0
    converged = n_iter < max_iter or grad <= tol
    return W.detach(), b.detach(), n_iter, converged


def recency_masks(m: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float64
                  ) -> list[Float[Tensor, "m m"]]:
    """For each ring-buffer position ``head`` (the slot the next pair goes to), ``[j, i] = 1`` where slot ``i``
    holds a newer pair than slot ``j`` (slot ``head - 1`` is the newest, slot ``head`` the oldest)."""
    out = []
    for head in range(m):
        rec = torch.tensor([(head - 1 - s) % m for s in range(m)])  # 0: the newest pair
        out.append((rec[None, :] < rec[:, None]).to(device=device, dtype=dtype))
    return out


def lbfgs_direction(g: Float[Tensor, "problem f"], S: Float[Tensor, "problem m f"], Y: Float[Tensor, "problem m f"],
                    rho: Float[Tensor, "problem m"], scale: Float[Tensor, " problem"], newer: Float[Tensor, "m m"],
                    Pg: Float[Tensor, "problem f"] | None = None, PY: Float[Tensor, "problem m f"] | None = None
                    ) -> Float[Tensor, "problem f"]:
    """The L-BFGS direction ``-H g`` of each problem, ``H`` from the pairs ``(s_i, y_i)`` with ``rho_i = 1 / s_i·y_i``
    (0: a slot to skip) and ``H_0 = scale · I``, or ``H_0 = scale · P`` for a fixed preconditioner ``P`` given as
    ``Pg = P g`` and ``PY = (P y_i)_i`` (the caller keeps them: ``P`` is linear, so ``P y_i = P g_{i+1} − P g_i``
    needs no product of its own): what the two-loop recursion computes, in ~30-35 kernels (m = 10-20)
    instead of ~11 per pair. The recursion's coefficients solve two triangular systems:

    * first loop (newest pair first): ``α_j = ρ_j s_j·(q_0 − Σ_{i newer} α_i y_i)``, so
      ``(I + diag(ρ) N) α = ρ ⊙ Sᵀq_0`` with ``N = (Sᵀ Y) ⊙ newer`` (``q_0 = −g``);
    * second loop (oldest first), from ``r_0 = H_0 (q_0 − Yᵀα)`` (``= −scale · (P g + (PY)ᵀα)`` preconditioned):
      ``β_j = ρ_j y_j·(r_0 + Σ_{i older} (α_i − β_i) s_i)``, so ``(I + diag(ρ) Nᵀ) β = ρ ⊙ (Yᵀ r_0 + Nᵀ α)``; the
      direction is ``r_0 + Sᵀ(α − β)``.

    ``N`` is strictly triangular in recency order, so ``X = −diag(ρ) N`` is nilpotent (``X^m = 0``, exactly: the
    zero pattern survives rounding) and ``(I − X)^{-1} = Π_k (I + X^{2^k})`` over ``2^k < m``: a few small matrix
    products, no solver (nothing that syncs the host or escapes a CUDA graph). In float64 (the fits' default) it
    agrees with the pair-by-pair recursion to ~1e-15; in float32 (the MPS fallback) it is 10-30 times less accurate
    on nearly collinear histories (~3e-6), still far inside what rounding moves an L-BFGS trajectory by."""
    m = S.shape[1]
    q0 = -g[..., None]  # [problem, f, 1]
    N = torch.bmm(S, Y.transpose(1, 2)).mul_(newer)  # [problem, j, i] = s_j·y_i where i is newer than j
    neg_rho = -rho[..., None]

    def solve(X: Tensor, v: Tensor) -> Tensor:  # (I - X)^{-1} v for a nilpotent X of index <= m
        w, P, k = v, X, 1
        while True:
            w = torch.baddbmm(w, P, w)
            k *= 2
            if k >= m:
                return w
            P = torch.bmm(P, P)

    alpha = solve(N * neg_rho, rho[..., None] * torch.bmm(S, q0))  # [problem, m, 1]
    if PY is None:
        r0 = (q0 - torch.bmm(Y.transpose(1, 2), alpha)) * scale[:, None, None]
    else:
        r0 = torch.baddbmm(Pg[..., None], PY.transpose(1, 2), alpha).mul_(-scale[:, None, None])
    Nt = N.transpose(1, 2)  # [j, i] = y_j·s_i where i is older than j
    beta = solve(Nt * neg_rho, rho[..., None] * (torch.bmm(Y, r0) + torch.bmm(Nt, alpha)))
    return (r0 + torch.bmm(S.transpose(1, 2), alpha - beta))[..., 0]


def logreg_preconditioner(Za: Float[Tensor, "problem sample f"], pen: Float[Tensor, "f 1"], reg: float,
                          curvature: float) -> Float[Tensor, "problem f f"]:
    """``P = (curvature · Zaᵀ Za / n + 2 · reg · diag(pen))⁻¹`` per problem: the inverse of the regularised
    logistic objective's Hessian with the softmax's curvature taken as one constant (its value at θ = 0), the
    initial inverse Hessian :func:`batched_lbfgs_logreg` starts its recursion from. The matrix is formed on
    ``Za``'s device and factored by Cholesky in float64 (on the CPU where the device has no float64 or no
    factorisation, e.g. MPS), without a host round trip on CUDA; a problem whose factor fails or is nearly singular
    (a pivot below 1e-8 of its largest: P would be mostly rounding) gets ``P = I`` (plain L-BFGS)."""
    L, n, f = Za.shape
    ridge = torch.diag(2.0 * reg * pen[:, 0]).expand(L, f, f)
    A = torch.baddbmm(ridge, Za.transpose(1, 2), Za, alpha=curvature / n)
    if Za.device.type not in ("cuda", "cpu"):
        A = A.cpu()
    chol, info = torch.linalg.cholesky_ex(A.double())
    del A
    piv = chol.diagonal(dim1=1, dim2=2).abs()
    # (read on the device) a failed or nearly singular factor is replaced by I, whose inverse is I
    bad = (info != 0) | (piv.amin(1) < 1e-8 * piv.amax(1)) | ~piv.isfinite().all(1)
    chol.masked_fill_(bad[:, None, None], 0.0).diagonal(dim1=1, dim2=2).add_(bad[:, None].to(chol.dtype))
    # (about three [f, f] per problem alive at once: the matrix or its factor, cholesky_inverse's copy, P)
    return torch.cholesky_inverse(chol).to(Za.device, Za.dtype)


def _graphs_on(device: torch.device) -> bool:
    """Whether :func:`batched_lbfgs_logreg` records its iteration as a CUDA graph on ``device`` (CUDA only)."""
    return device.type == "cuda"


def _run_then_record(fn: Callable[[], None], device: torch.device) -> Callable[[], None]:
    """Run ``fn`` once for real (on a side stream: it warms the kernels up and allocates what it keeps), then record
    it as a CUDA graph without running it, and return the graph's replay: one call = one more run of ``fn`` on the
    state as the last run left it. If recording fails, a warning, and ``fn`` itself (the same runs, launched one
    by one)."""
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream(device).wait_stream(side)
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # recorded, not run
            fn()
        return graph.replay
    except Exception as e:  # noqa: BLE001 - any capture failure: the same iterations, launched one by one
        warnings.warn(f"CUDA graph capture of the probe fit failed ({type(e).__name__}: {e}); running it "
                      "eagerly (same result, slower).", RuntimeWarning, stacklevel=3)
        return fn


def batched_lbfgs_logreg(Z: Float[Tensor, "problem sample d"], y: Int[Tensor, "sample"], n_classes: int, C: float,
                         *, max_iter: int = 2000, tol: float = 1e-4, history_size: int = 20,
                         cuda_graph: bool | None = None, precondition: bool | None = None
                         ) -> tuple[Float[Tensor, "problem d k"], Float[Tensor, "problem k"], int, bool]:
    """The objective of :func:`lbfgs_logreg`, minimised by one L-BFGS *per problem* (layer or ablated set), all
    problems advanced together in batched tensor ops with no host round trip inside a block of ``history_size``
    iterations: the accelerator's solver. (torch's LBFGS reads Python floats several times per iteration and
    shares one step size across the stacked problems; on a GPU it is bound by launches and syncs.)

    Each iteration: the two-loop recursion's direction over the last ``history_size`` pairs
    (:func:`lbfgs_direction`: small matrix products, not a loop over the pairs), a line search that scores 12 step
    sizes (2, 1, 1/2, ..., 2^-10) in one pass (logits are linear in the step, ``Z(θ + αp) = Zθ + α·Zp``) and takes,
    per problem, the lowest loss if it meets the Armijo condition (else no step and a fresh history), and the
    gradient there. Two passes over the data per iteration (``Zp`` and the gradient's ``Zᵀ G``): the new logits
    are ``Zθ + α·Zp``, recomputed exactly once per block. A problem stops moving once every entry of its gradient is
    below ``tol`` (scikit-learn's rule), or when even a steepest-descent step cannot lower its loss (rounding).
    ``history_size`` 20 (as the joint solver's): on SmolLM2-135M's 30 layers of residuals it stops after 302
    iterations where 10 pairs took 344 (504 → 416 with SmolLM2's shapes and random weights, the benchmark's model);
    the pairs' cost per iteration is small beside the two passes over the data.

    ``precondition`` (None: when ``d + 1 <= 2 · sample``, where applying ``P`` costs at most the iteration's two
    passes over the data): the recursion starts from ``H_0 = γ P`` with ``P`` the inverse of the objective's
    Hessian at θ = 0 up to the softmax's curvature (:func:`logreg_preconditioner`), instead of ``γ I``.
    Residual-stream features are strongly correlated, which is what makes L-BFGS slow here; L-BFGS from ``γ P`` takes
    the steps it would take on decorrelated ("whitened") features, so it needs 3-4 times fewer iterations
    (SmolLM2-135M's 30 layers: 302 → 103; SmolLM2's shapes with random weights: 416 → 129) for one more ``[d, d]``
    product per iteration. The objective, the line search and the stopping rule are the same; only the path to the
    optimum changes.

    The host checks once per block of ``history_size`` iterations whether all have stopped. On CUDA (``cuda_graph``
    None or True) one iteration is recorded as a CUDA graph (the ring slot it writes is read on the device) and
    replayed, so an iteration costs its kernels' run time, not their launches, and recording costs one iteration's
    kernels, not a block's.
    Returns ``W, b, n_iter, converged`` like :func:`lbfgs_logreg` (``n_iter``: iterations until the last problem
    stopped)."""
    L, n, d = Z.shape
    k = 1 if n_classes == 2 else n_classes
    dev, dt = Z.device, Z.dtype
    m = int(history_size)
    Za = torch.cat([Z, Z.new_ones(L, n, 1)], dim=2)  # the intercept as a last feature
    Zt = Za.transpose(1, 2).contiguous()
    onehot = torch.nn.functional.one_hot(y.to(dev).long(), n_classes).to(dt)  # [sample, classes]
    tgt = (onehot[:, 1:] if k == 1 else onehot).contiguous()  # the true class among the k fitted logit columns
    pen = torch.ones(d + 1, 1, dtype=dt, device=dev)
    pen[d] = 0.0  # intercept unpenalised
    reg = 1.0 / (2.0 * C * n)
    if precondition is None:
        precondition = d + 1 <= 2 * n
    # (at θ = 0 every class is equally likely: the softmax's curvature is 1/K per class, 1/4 for a binary logit)
    P = logreg_preconditioner(Za, pen, reg, 0.25 if k == 1 else 1.0 / n_classes) if precondition else None
    steps = 2.0 ** -torch.arange(-1, 11, dtype=dt, device=dev)  # 2, 1, 1/2, ..., 2^-10
    c1 = 1e-4

    def vdot(a: Tensor, b: Tensor) -> Tensor:
        """Per-problem dot product over the trailing ``[·, k]``, one kernel (``b`` without a problem axis: shared)."""
        if b.dim() == 2:
            return torch.mv(a.flatten(1), b.reshape(-1))
        return torch.bmm(a.flatten(1)[:, None], b.flatten(1)[:, :, None]).view(-1)

    def loss_grad(theta: Tensor, logits: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Loss, gradient and logits at ``theta`` (``logits``: ``Za θ`` when the caller already has it)."""
        if logits is None:
            logits = torch.bmm(Za, theta)  # [problem, sample, k]
        full = torch.cat([torch.zeros_like(logits), logits], dim=-1) if k == 1 else logits
        logp = torch.log_softmax(full, dim=-1)
        loss = -(logp * onehot).sum((1, 2)) / n + reg * vdot(pen * theta, theta)
        G = (logp.exp() - onehot) / n
        if k == 1:
            G = G[..., 1:]
        grad = torch.bmm(Zt, G).addcmul_(pen.expand_as(theta), theta, value=2 * reg)
        return loss, grad, logits

    def cand_loss(logits: Tensor, Bp: Tensor) -> Tensor:
        """Mean cross-entropy of ``logits + α·Bp`` for every step ``α``: ``[problem, step]``. The true class's
        logit is linear in ``α``; only the log-sum-exp runs per step."""
        lin = vdot(logits, tgt)[:, None] / n + steps * (vdot(Bp, tgt) / n)[:, None]
        if k == 1:
            logits, Bp = (torch.cat([torch.zeros_like(t), t], dim=-1) for t in (logits, Bp))
        lt, bt = logits.transpose(1, 2), Bp.transpose(1, 2)  # classes before samples: the reduction vectorises
        cand = torch.addcmul(lt[:, None], steps[None, :, None, None], bt[:, None])  # [problem, step, k, sample]
        return cand.logsumexp(2).sum(-1) / n - lin

    # the whole state lives in these tensors, updated in place (a CUDA graph replays on fixed addresses)
    theta = torch.zeros(L, d + 1, k, dtype=dt, device=dev)
    S = torch.zeros(L, m, (d + 1) * k, dtype=dt, device=dev)  # the pairs, problem-major (each a flat [(d+1)·k])
    Y = torch.zeros_like(S)
    rho = torch.zeros(L, m, dtype=dt, device=dev)  # 0: an empty or rejected slot (the recursion skips it)
    newer = torch.stack(recency_masks(m, dev, dt))  # [ring position, m, m]: made before a CUDA graph records
    gamma = torch.ones(L, dtype=dt, device=dev)  # initial inverse-Hessian scale: s·y / y·y of the newest pair
    fresh = torch.ones(L, dtype=torch.bool, device=dev)  # no usable pair: steepest descent of unit length
    loss, g, logits = loss_grad(theta)
    if P is not None:  # P g of the current gradient, and P y of each pair (ring-buffered beside Y)
        Pg, PY = torch.bmm(P, g), torch.zeros_like(Y)
    active = g.abs().amax((1, 2)) > tol
    it_t = torch.zeros(1, dtype=torch.long, device=dev)  # iterations run; it_t mod m is the ring slot written next
    done_at = torch.where(active, torch.full((L,), max_iter, dtype=torch.long, device=dev),
                          torch.zeros(L, dtype=torch.long, device=dev))

    def iteration() -> None:
        # the ring slot is read on the device, so one recorded iteration serves every slot: a CUDA graph of one
        # iteration, replayed, where recording a whole block cost as much as ~60 eager iterations
        head = it_t.remainder(m)
        recency = newer.index_select(0, head)[0]
        if P is None:
            scale = torch.where(fresh, 1.0 / g.flatten(1).norm(dim=1).clamp_min(1e-30), gamma)
            p = lbfgs_direction(g.flatten(1), S, Y, rho, scale, recency).view_as(g)
        else:  # a fresh start steps along -P g, of unit length in P's metric (unit length after whitening)
            scale = torch.where(fresh, vdot(g, Pg).clamp_min(torch.finfo(dt).tiny).rsqrt(), gamma)
            p = lbfgs_direction(g.flatten(1), S, Y, rho, scale, recency, Pg.flatten(1), PY).view_as(g)
        gp = vdot(g, p)
        Bp = torch.bmm(Za, p)
        pt = pen * theta
        f = cand_loss(logits, Bp) + reg * (vdot(pt, theta)[:, None] + 2 * steps * vdot(pt, p)[:, None]
                                            + steps * steps * vdot(pen * p, p)[:, None])
        best = f.argmin(1)
        a_best = steps[best]
        ok = (f.gather(1, best[:, None])[:, 0] <= loss + c1 * a_best * gp) & (gp < 0) & active
        a = a_best * ok  # no step where the line search failed
        s = p * a[:, None, None]
        theta.add_(s)
        # the logits are linear in θ: Za(θ + s) = Zaθ + a·Za p, so the step's logits come from Bp without a pass
        # over the data (the fit's largest cost: it is bound by reading Za; two passes per iteration, not three)
        # (where the search failed the logits stay as they are: 0·Bp would be NaN where Bp overflowed)
        stepped = torch.where(ok[:, None, None], torch.addcmul(logits, a[:, None, None], Bp), logits)
        loss_new, g_new, logits_new = loss_grad(theta, stepped)
        yv = g_new - g
        sy = vdot(s, yv)
        if P is None:
            yy = vdot(yv, yv)
        else:  # γ = s·y / y·Py: the scale whitened coordinates would give
            Pg_new = torch.bmm(P, g_new)
            Pyv = Pg_new - Pg
            yy = vdot(yv, Pyv)
            PY.index_copy_(1, head, Pyv.flatten(1)[:, None])
            Pg.copy_(Pg_new)
        good = ok & (sy > 1e-10 * yy) & (yy > 0)
        S.index_copy_(1, head, s.flatten(1)[:, None])
        Y.index_copy_(1, head, yv.flatten(1)[:, None])
        rho.index_copy_(1, head, torch.div(good, torch.where(good, sy, 1.0))[:, None])  # 1 / s·y, or 0: skip it
        # written in place (out=): every kernel saved counts, the fit being bound by its kernels, not its arithmetic
        torch.where(good, sy / torch.where(good, yy, 1.0), gamma, out=gamma)
        # a rejected step starts the problem's history afresh; a rejected steepest-descent step means no step
        # size can lower the loss any more (rounding): that problem stops, as torch's LBFGS does on no change
        reset = active & ~ok
        stuck = reset & fresh
        rho.masked_fill_(reset[:, None], 0.0)
        fresh.copy_((fresh & ~good) | reset)
        loss.copy_(loss_new)
        g.copy_(g_new)
        logits.copy_(logits_new)
        it_t.add_(1)
        now = active & (g.abs().amax((1, 2)) > tol) & ~stuck
        torch.where(active & ~now, it_t, done_at, out=done_at)
        active.copy_(now)

    step, it = iteration, 0
    if cuda_graph is not False and _graphs_on(dev) and max_iter > 1:
        step, it = _run_then_record(iteration, dev), 1
    # blocks of history_size iterations (the ring buffer back at slot 0): the host reads whether any problem is
    # still moving once per block, and the logits are recomputed exactly at each block's start, so the steps'
    # updates of them (Zθ + a·Zp) do not build up rounding
    while it < max_iter and bool(active.any()):
        if it % m == 0:
            torch.bmm(Za, theta, out=logits)
        for _ in range(m - it % m):
            step()
        it += m - it % m
    # whole blocks run, so the last may pass max_iter by up to m - 1 iterations: a problem that stopped only
    # there did not converge within max_iter
    stopped = not bool(active.any())
    n_iter = int(done_at.max()) if stopped else int(it_t)
    converged = stopped and n_iter <= max_iter
    return theta[:, :d].contiguous(), theta[:, d].contiguous(), n_iter, converged


def auto_optimizer(device: torch.device) -> str:
    """The L-BFGS variant ``optimizer="auto"`` takes on ``device``: ``"batched"`` (one L-BFGS per problem, no host
    round trip inside a block) on an accelerator, ``"joint"`` (torch's LBFGS) on the CPU, where the batched line
    search's 12 trial steps cost more than they save. Callers that fit several problems (the ablation's refits)
    ask it too, so that one switch decides the CPU's and the accelerator's route."""
    return "joint" if torch.device(device).type == "cpu" else "batched"


def fit_probes(X: Float[Tensor, "layer sample d_model"] | Sequence[ArrayLike], y: ArrayLike, *,
               layers: Sequence[int | None] | None = None, device: str | torch.device | None = None,
               dtype: torch.dtype = torch.float64, optimizer: str = "auto", **params) -> list["WordIndexProbe"]:
    """Fit one torch-solver probe per layer in a single batched optimisation (same labels for every layer).

    ``X`` is ``[layer, sample, d_model]`` (or a list of ``[sample, d_model]`` arrays); ``layers`` names
    each slice (the probes' ``layer``). Other keyword arguments are :class:`WordIndexProbe` parameters.
    The fit runs on ``device`` (default: ``X``'s device); the probes' weights come back to the host.
    ``optimizer``: ``"joint"`` (:func:`lbfgs_logreg`, torch's LBFGS over the stacked weights), ``"batched"``
    (:func:`batched_lbfgs_logreg`, one L-BFGS per layer, launch- and sync-free) or ``"auto"``: batched on an
    accelerator, joint on the CPU (there the batched line search's 12 trial steps cost more than they save).
    """
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}.")
    if not isinstance(X, Tensor):
        X = torch.stack([torch.as_tensor(_np(x)) for x in X])
    if X.ndim != 3:
        raise ConfigError(f"X must be [n_layers, n_samples, d_model], got shape {tuple(X.shape)}.")
    y_np = _int_labels(y)
    _check_xy(tuple(X.shape[1:]), y_np)
    layers = list(layers) if layers is not None else [params.pop("layer", None)] * len(X)
    if len(layers) != len(X):
        raise ConfigError(f"{len(X)} layers of residuals but {len(layers)} layer names; pass one per slice.")
    params.pop("layer", None)
    params["solver"] = "torch"
    probes = [WordIndexProbe(layer=L, **params) for L in layers]  # the fit device is a run-time choice
    p0 = probes[0]
    _check_params(p0.C, p0.max_iter, p0.model)
    dev = _resolve_device(device if device is not None else p0.device, X)
    if dev.type == "mps" and dtype == torch.float64:  # no float64 there
        dtype = torch.float32
    X = X.to(dev, dtype)
    if not bool(torch.isfinite(X).all()):  # (one read on the host per fit) NaN would fit NaN weights silently
        raise ConfigError(NONFINITE_RESIDUALS)
    classes, y_idx = np.unique(y_np, return_inverse=True)
    mean, scale = _torch_standardize(X, p0.standardize)
    Z = (X - mean[:, None]) / scale[:, None]
    del X
    if optimizer == "auto":
        optimizer = auto_optimizer(dev)
    solve = batched_lbfgs_logreg if optimizer == "batched" else lbfgs_logreg
    W, b, n_iter, converged = solve(Z, torch.as_tensor(y_idx), len(classes), p0.C, max_iter=p0.max_iter, tol=p0.tol)
    if not converged:
        warnings.warn(f"torch L-BFGS did not converge in max_iter={p0.max_iter} iterations; raise max_iter.",
                      ConvergenceWarning, stacklevel=2)
    W, b = W.transpose(1, 2).cpu().numpy(), b.cpu().numpy()  # sklearn's [k, d] coefficient layout
    mean, scale = mean.cpu().numpy(), scale.cpu().numpy()
    for i, probe in enumerate(probes):
        probe._set_fitted(W[i], b[i], mean[i], scale[i], classes, n_samples=len(y_np))
        probe.n_iter_ = np.array([n_iter])
    return probes


class WordIndexProbe(ClassifierMixin, BaseEstimator):
    """Predict a token's word index from its residual vector.

    Parameters are scikit-learn style hyperparameters; ``layer``, ``site`` and ``model`` only record
    where the probe reads (so patching can refuse a probe fitted elsewhere).

    Fitted attributes: ``classes_``, ``n_features_in_``, ``coef_``/``intercept_`` (in standardised
    space, as sklearn fits them), ``directions_`` ``[n_classes, d_model]`` and ``bias_`` ``[n_classes]``
    (in the model's residual basis: ``logits = x @ directions_.T + bias_``).
    """

    def __init__(self, C: float = 1.0, standardize: bool = True, max_iter: int = 2000, tol: float = 1e-4,
                 random_state: int | None = 0, layer: int | None = None, site: str = "resid_post",
                 model: str | None = None, solver: str = DEFAULT_SOLVER, device: str | None = None):
        self.C = C
        self.standardize = standardize
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state
        self.layer = layer
        self.site = site
        self.model = model
        self.solver = solver
        self.device = device

    def fit(self, X: ArrayLike, y: ArrayLike) -> "WordIndexProbe":
        """Fit on residual vectors ``X`` ``[n, d_model]`` and word indices ``y`` ``[n]`` with ``solver``:
        ``"torch"`` runs on ``device`` (default: ``X``'s device), ``"sklearn"`` on the host."""
        if self.solver not in SOLVERS:
            raise ConfigError(f"solver must be one of {SOLVERS}, got {self.solver!r}.")
        _check_params(self.C, self.max_iter, self.model)
        if self.solver == "torch":
            Xt = X if isinstance(X, Tensor) else torch.as_tensor(_np(X))
            if Xt.ndim != 2:
                raise ConfigError(f"X must be [n_samples, d_model], got shape {tuple(Xt.shape)}.")
            params = {k: v for k, v in self.get_params().items() if k not in ("layer", "solver")}
            fitted = fit_probes(Xt[None], y, layers=[self.layer], **params)[0]
            self.__dict__.update({k: v for k, v in fitted.__dict__.items() if k.endswith("_")})
            return self
        X, y = _np(X).astype(np.float64), _int_labels(y)
        _check_xy(X.shape, y)
        if not np.isfinite(X).all():
            raise ConfigError(NONFINITE_RESIDUALS)
        scaler = StandardScaler(with_mean=self.standardize, with_std=self.standardize).fit(X)
        clf = LogisticRegression(C=self.C, max_iter=self.max_iter, tol=self.tol, random_state=self.random_state)
        clf.fit(scaler.transform(X), y)
        mean = scaler.mean_ if self.standardize else np.zeros(X.shape[1])
        scale = scaler.scale_ if self.standardize else np.ones(X.shape[1])
        self._set_fitted(clf.coef_, clf.intercept_, mean, scale, clf.classes_, n_samples=len(y), clf=clf)
        return self

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())  # a copy: object.__getstate__ may hand back __dict__ itself
        state.pop("_weights_on", None)  # the weights' device copy (see logits): rebuilt on use, never pickled
        return state

    def _set_fitted(self, coef: np.ndarray, intercept: np.ndarray, mean: np.ndarray, scale: np.ndarray,
                    classes: np.ndarray, *, n_samples: int | None = None, clf: LogisticRegression | None = None
                    ) -> None:
        """Set every fitted attribute from standardised-space weights and the standardisation."""
        coef, intercept = np.asarray(coef, np.float64), np.asarray(intercept, np.float64)
        mean, scale = np.asarray(mean, np.float64), np.asarray(scale, np.float64)
        d = coef.shape[1]
        scaler = StandardScaler(with_mean=self.standardize, with_std=self.standardize)
        scaler.mean_, scaler.scale_, scaler.var_ = mean, scale, scale ** 2
        scaler.n_features_in_ = d
        scaler.n_samples_seen_ = n_samples if n_samples is not None else 0
        if clf is None:  # a LogisticRegression carrying the weights: decision_function/predict as sklearn's
            clf = LogisticRegression(C=self.C)
            clf.coef_, clf.intercept_, clf.classes_ = coef, intercept, np.asarray(classes)
            clf.n_features_in_ = d
        self.scaler_, self.clf_ = scaler, clf
        self.classes_ = clf.classes_
        self.n_features_in_ = d
        self.coef_, self.intercept_ = coef, intercept
        directions = coef / scale
        self.directions_ = torch.tensor(directions, dtype=torch.float32)
        self.bias_ = torch.tensor(intercept - directions @ mean, dtype=torch.float32)

    def _check_shape(self, shape: tuple[int, ...]) -> None:
        check_is_fitted(self, "directions_")
        if len(shape) != 2 or shape[1] != self.n_features_in_:
            raise ConfigError(f"expected residual vectors of shape [n, {self.n_features_in_}], got {tuple(shape)}; "
                              "was the probe fitted on another model?")

    def _check(self, X: ArrayLike) -> np.ndarray:
        X = _np(X)
        self._check_shape(X.shape)
        return X

    def _on_device(self, X: ArrayLike) -> Tensor | None:
        """Decision values computed where ``X`` lives when that is an accelerator (float64, the standardisation
        and weights as fitted; argmax ties aside the same predictions as the host path), else None: scoring 30
        layers' residuals kept on a GPU then costs one small copy per call instead of moving every residual."""
        if not isinstance(X, Tensor) or X.device.type == "cpu":
            return None
        return self._torch_decision(X)

    def _torch_decision(self, X: Tensor) -> Tensor:
        """``decision_function`` in torch on ``X``'s device: ``[n, k]`` (``k = 1`` for two classes)."""
        self._check_shape(tuple(X.shape))
        t = lambda a: torch.as_tensor(np.asarray(a, np.float64), device=X.device)  # noqa: E731
        Z = (X.to(torch.float64) - t(self.scaler_.mean_)) / t(self.scaler_.scale_)
        return Z @ t(self.coef_).T + t(self.intercept_)

    def _host_decision(self, X: ArrayLike) -> np.ndarray:
        """``decision_function`` on the host: scikit-learn's arithmetic (``StandardScaler.transform``, then
        ``X @ coef_.T + intercept_``), bit for bit, without its input validation, which cost more than the
        arithmetic when a sweep scores 30 layers three times each. ``[n, k]`` (``k = 1`` for two classes)."""
        Z = self._check(X).astype(np.float64)  # a private copy, standardised in place as scikit-learn does
        if len(Z) == 0:
            raise ConfigError("no residual vectors to score (0 samples); is the split empty?")
        if not np.isfinite(Z).all():
            raise ConfigError(NONFINITE_RESIDUALS)
        if self.standardize:
            Z -= self.scaler_.mean_
            Z /= self.scaler_.scale_
        return Z @ self.coef_.T + self.intercept_

    def _decision(self, X: ArrayLike) -> np.ndarray:
        """Decision values ``[n, k]`` (``k = 1`` for two classes), computed where ``X`` lives."""
        dev = self._on_device(X)
        return dev.cpu().numpy() if dev is not None else self._host_decision(X)

    def decision_function(self, X: ArrayLike) -> np.ndarray:
        d = self._decision(X)
        return d[:, 0] if d.shape[1] == 1 else d

    def predict_proba(self, X: ArrayLike) -> np.ndarray:
        X = self._check(X).astype(np.float64)
        return self.clf_.predict_proba(self.scaler_.transform(X))

    def predict(self, X: ArrayLike) -> np.ndarray:
        """The predicted word index of each residual vector in ``X`` (``[sample, d_model]``)."""
        d = self._decision(X)  # scikit-learn's rule: argmax, or decision > 0 for two classes
        idx = decision_index(d)
        return np.asarray(self.classes_)[idx]

    def score(self, X: ArrayLike, y: ArrayLike, sample_weight: ArrayLike | None = None) -> float:
        """Accuracy of ``predict(X)`` against ``y`` (scikit-learn's ``score``, without its target checks)."""
        y = _np(y).reshape(-1)
        if y.dtype.kind not in "biu" and not (y.dtype.kind == "f" and np.array_equal(y, np.round(y))):
            raise ConfigError(f"y must hold word indices (integers), got {y.dtype} values such as {y[:3].tolist()}.")
        pred = self.predict(X)
        if len(pred) != len(y):
            raise ConfigError(f"X has {len(pred)} samples but y has {len(y)} labels; pass matching arrays.")
        if sample_weight is None:
            return float(np.mean(pred == y))
        w = _np(sample_weight).reshape(-1)
        if len(w) != len(y) or not w.sum() > 0:
            raise ConfigError(f"sample_weight must hold one weight per sample ({len(y)}) with a positive sum; got "
                              f"{len(w)} weights summing to {w.sum()}.")
        return float(np.average(pred == y, weights=w))

    def logits(self, resid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... n_classes"]:
        """Differentiable probe logits in torch, on ``resid``'s device and dtype."""
        check_is_fitted(self, "directions_")
        D, b = self.directions_, self.bias_
        key = (resid.device, resid.dtype, id(D), D._version, id(b), b._version)
        cached = self.__dict__.get("_weights_on")
        if cached is None or cached[0] != key:  # (the cache holds D and b, so their ids stay theirs)
            # kept per device and dtype: a host-to-device copy per call would stall an accelerator's queue
            cached = (key, (D, b), D.to(resid.device, resid.dtype).T, b.to(resid.device, resid.dtype))
            self.__dict__["_weights_on"] = cached
        return resid @ cached[2] + cached[3]

    # ---------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write ``probe.npz`` (weights) + ``probe.json`` (hyperparameters, classes) into directory ``path``."""
        from wordpos.probing.io import write_json, write_npz

        check_is_fitted(self, "directions_")
        path = Path(path)
        write_npz(path / "probe.npz", coef=self.coef_, intercept=self.intercept_, mean=self.scaler_.mean_,
                  scale=self.scaler_.scale_, classes=self.classes_)
        write_json(path / "probe.json", {"format": "wordpos.WordIndexProbe/1", "params": self.get_params(),
                                         "n_features_in": int(self.n_features_in_)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "WordIndexProbe":
        """Read a probe written by :meth:`save` (its directory)."""
        from wordpos.probing.io import read_json, read_npz

        path = Path(path)
        meta = read_json(path / "probe.json", "probe description")
        if not isinstance(meta, dict) or meta.get("format") != "wordpos.WordIndexProbe/1":
            raise CorruptFileError(f"{path / 'probe.json'} is not a wordpos probe; point --probe at a directory "
                                   "written by `wordpos probe`.")
        arrays = read_npz(path / "probe.npz", "probe weights")
        probe = cls(**meta["params"])
        probe._set_fitted(arrays["coef"], arrays["intercept"], arrays["mean"], arrays["scale"], arrays["classes"])
        return probe

    def check_compatible(self, model_name: str | None, layer: int | None = None, d_model: int | None = None) -> None:
        """Refuse to be used on a model or layer it was not fitted on."""
        check_is_fitted(self, "directions_")
        if d_model is not None and d_model != self.n_features_in_:
            raise ConfigError(f"the probe reads {self.n_features_in_}-dim residuals but the model has "
                              f"d_model={d_model}: it was fitted on another model. Fit a probe on this model.")
        if model_name and not self.model:
            warnings.warn(f"this probe does not record the model it was fitted on, so it cannot be checked against "
                          f"{model_name!r} (a probe of another model of the same width would pass): fit it with "
                          "WordIndexProbe(model=acts.model_name, ...).", UserWarning, stacklevel=4)
        if model_name and self.model and model_name != self.model:
            raise ConfigError(f"the probe was fitted on model {self.model!r}, not {model_name!r}; fit one on "
                              f"this model (`wordpos probe --model {model_name}`).")
        if layer is not None and self.layer is not None and layer != self.layer:
            raise ConfigError(f"the probe reads layer {self.layer}, but layer {layer} was requested; use the "
                              "probe's layer or fit a probe at that layer.")

