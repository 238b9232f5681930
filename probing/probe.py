"""The word-index probe: multinomial logistic regression on residual vectors, as a scikit-learn estimator.

Its learned directions are exposed in the model's own residual basis (standardisation folded back in),
so patching code can compute probe logits inside a forward pass as ``resid @ directions_.T + bias_``
and differentiate through them.

Two solvers give the same optimum: ``"sklearn"`` (scikit-learn's L-BFGS on the host) and ``"torch"``
(torch's L-BFGS with a strong-Wolfe line search, on the data's device). The torch solver can fit every
layer in one optimisation over a ``[n_layers, d_model, n_classes]`` weight tensor (:func:`fit_probes`),
which is what a layer sweep uses.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
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
DEFAULT_SOLVER = "torch"  # held-out accuracy within 0.5 point of scikit-learn's (organism, SmolLM2; see tests)


def _np(x: ArrayLike) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _check_xy(X_shape: tuple[int, ...], y: np.ndarray) -> None:
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


def fit_probes(X: Float[Tensor, "layer sample d_model"] | Sequence[ArrayLike], y: ArrayLike, *,
               layers: Sequence[int | None] | None = None, device: str | torch.device | None = None,
               dtype: torch.dtype = torch.float64, **params) -> list["WordIndexProbe"]:
    """Fit one torch-solver probe per layer in a single batched optimisation (same labels for every layer).

    ``X`` is ``[layer, sample, d_model]`` (or a list of ``[sample, d_model]`` arrays); ``layers`` names
    each slice (the probes' ``layer``). Other keyword arguments are :class:`WordIndexProbe` parameters.
    The fit runs on ``device`` (default: ``X``'s device); the probes' weights come back to the host.
    """
    if not isinstance(X, Tensor):
        X = torch.stack([torch.as_tensor(_np(x)) for x in X])
    if X.ndim != 3:
        raise ConfigError(f"X must be [n_layers, n_samples, d_model], got shape {tuple(X.shape)}.")
    y_np = _np(y).astype(np.int64)
    _check_xy(tuple(X.shape[1:]), y_np)
    layers = list(layers) if layers is not None else [params.pop("layer", None)] * len(X)
    if len(layers) != len(X):
        raise ConfigError(f"{len(X)} layers of residuals but {len(layers)} layer names; pass one per slice.")
    params.pop("layer", None)
    params["solver"] = "torch"
    probes = [WordIndexProbe(layer=L, **params) for L in layers]  # the fit device is a run-time choice
    p0 = probes[0]
    dev = _resolve_device(device if device is not None else p0.device, X)
    if dev.type == "mps" and dtype == torch.float64:  # no float64 there
        dtype = torch.float32
    X = X.to(dev, dtype)
    classes, y_idx = np.unique(y_np, return_inverse=True)
    mean, scale = _torch_standardize(X, p0.standardize)
    Z = (X - mean[:, None]) / scale[:, None]
    del X
    W, b, n_iter, converged = lbfgs_logreg(Z, torch.as_tensor(y_idx), len(classes), p0.C,
                                           max_iter=p0.max_iter, tol=p0.tol)
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
        if self.solver == "torch":
            Xt = X if isinstance(X, Tensor) else torch.as_tensor(_np(X))
            if Xt.ndim != 2:
                raise ConfigError(f"X must be [n_samples, d_model], got shape {tuple(Xt.shape)}.")
            params = {k: v for k, v in self.get_params().items() if k not in ("layer", "solver")}
            fitted = fit_probes(Xt[None], y, layers=[self.layer], **params)[0]
            self.__dict__.update({k: v for k, v in fitted.__dict__.items() if k.endswith("_")})
            return self
        X, y = _np(X).astype(np.float64), _np(y).astype(np.int64)
        _check_xy(X.shape, y)
        scaler = StandardScaler(with_mean=self.standardize, with_std=self.standardize).fit(X)
        clf = LogisticRegression(C=self.C, max_iter=self.max_iter, tol=self.tol, random_state=self.random_state)
        clf.fit(scaler.transform(X), y)
        mean = scaler.mean_ if self.standardize else np.zeros(X.shape[1])
        scale = scaler.scale_ if self.standardize else np.ones(X.shape[1])
        self._set_fitted(clf.coef_, clf.intercept_, mean, scale, clf.classes_, n_samples=len(y), clf=clf)
        return self

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

    def _check(self, X: ArrayLike) -> np.ndarray:
        check_is_fitted(self, "directions_")
        X = _np(X)
        if X.ndim != 2 or X.shape[1] != self.n_features_in_:
            raise ConfigError(f"expected residual vectors of shape [n, {self.n_features_in_}], got {X.shape}; "
                              "was the probe fitted on another model?")
        return X

    def decision_function(self, X: ArrayLike) -> np.ndarray:
        X = self._check(X).astype(np.float64)
        return self.clf_.decision_function(self.scaler_.transform(X))

    def predict_proba(self, X: ArrayLike) -> np.ndarray:
        X = self._check(X).astype(np.float64)
        return self.clf_.predict_proba(self.scaler_.transform(X))

    def predict(self, X: ArrayLike) -> np.ndarray:
        X = self._check(X).astype(np.float64)
        return self.clf_.predict(self.scaler_.transform(X))

    def logits(self, resid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... n_classes"]:
        """Differentiable probe logits in torch, on ``resid``'s device and dtype."""
        check_is_fitted(self, "directions_")
        W = self.directions_.to(resid.device, resid.dtype)
        return resid @ W.T + self.bias_.to(resid.device, resid.dtype)

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
        if model_name and self.model and model_name != self.model:
            raise ConfigError(f"the probe was fitted on model {self.model!r}, not {model_name!r}; fit one on "
                              f"this model (`wordpos probe --model {model_name}`).")
        if layer is not None and self.layer is not None and layer != self.layer:
            raise ConfigError(f"the probe reads layer {self.layer}, but layer {layer} was requested; use the "
                              "probe's layer or fit a probe at that layer.")

