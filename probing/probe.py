"""The word-index probe: multinomial logistic regression on residual vectors, as a scikit-learn estimator.

Its learned directions are exposed in the model's own residual basis (standardisation folded back in),
so patching code can compute probe logits inside a forward pass as ``resid @ directions_.T + bias_``
and differentiate through them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted
from torch import Tensor

from probing.errors import ConfigError, CorruptFileError

ArrayLike = np.ndarray | Tensor


def _np(x: ArrayLike) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


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
                 model: str | None = None):
        self.C = C
        self.standardize = standardize
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state
        self.layer = layer
        self.site = site
        self.model = model

    def fit(self, X: ArrayLike, y: ArrayLike) -> "WordIndexProbe":
        X, y = _np(X).astype(np.float64), _np(y).astype(np.int64)
        if X.ndim != 2:
            raise ConfigError(f"X must be [n_samples, d_model], got shape {X.shape}.")
        if len(X) != len(y):
            raise ConfigError(f"X has {len(X)} samples but y has {len(y)} labels; pass matching arrays.")
        if len(np.unique(y)) < 2:
            raise ConfigError("y has a single class; the probe needs at least two word indices.")
        self.scaler_ = StandardScaler(with_mean=self.standardize, with_std=self.standardize).fit(X)
        clf = LogisticRegression(C=self.C, max_iter=self.max_iter, tol=self.tol, random_state=self.random_state)
        clf.fit(self.scaler_.transform(X), y)
        self.clf_ = clf
        self.classes_ = clf.classes_
        self.n_features_in_ = X.shape[1]
        self.coef_, self.intercept_ = clf.coef_, clf.intercept_
        scale = self.scaler_.scale_ if self.standardize else np.ones(X.shape[1])
        mean = self.scaler_.mean_ if self.standardize else np.zeros(X.shape[1])
        directions = clf.coef_ / scale
        self.directions_ = torch.tensor(directions, dtype=torch.float32)
        self.bias_ = torch.tensor(clf.intercept_ - directions @ mean, dtype=torch.float32)
        return self

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
        from probing.io import write_json, write_npz

        check_is_fitted(self, "directions_")
        path = Path(path)
        write_npz(path / "probe.npz", coef=self.coef_, intercept=self.intercept_, mean=self.scaler_.mean_
                  if self.standardize else np.zeros(self.n_features_in_),
                  scale=self.scaler_.scale_ if self.standardize else np.ones(self.n_features_in_),
                  classes=self.classes_)
        write_json(path / "probe.json", {"format": "wordpos.WordIndexProbe/1", "params": self.get_params(),
                                         "n_features_in": int(self.n_features_in_)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "WordIndexProbe":
        from probing.io import read_json, read_npz

        path = Path(path)
        meta = read_json(path / "probe.json", "probe description")
        if not isinstance(meta, dict) or meta.get("format") != "wordpos.WordIndexProbe/1":
            raise CorruptFileError(f"{path / 'probe.json'} is not a wordpos probe; point --probe at a directory "
                                   "written by `wordpos probe`.")
        arrays = read_npz(path / "probe.npz", "probe weights")
        probe = cls(**meta["params"])
        probe.scaler_ = StandardScaler(with_mean=probe.standardize, with_std=probe.standardize)
        probe.scaler_.mean_, probe.scaler_.scale_ = arrays["mean"], arrays["scale"]
        probe.scaler_.var_ = arrays["scale"] ** 2
        probe.scaler_.n_features_in_ = int(meta["n_features_in"])
        clf = LogisticRegression(C=probe.C)
        clf.coef_, clf.intercept_, clf.classes_ = arrays["coef"], arrays["intercept"], arrays["classes"]
        clf.n_features_in_ = int(meta["n_features_in"])
        probe.clf_, probe.classes_ = clf, clf.classes_
        probe.coef_, probe.intercept_ = clf.coef_, clf.intercept_
        probe.n_features_in_ = int(meta["n_features_in"])
        directions = clf.coef_ / arrays["scale"]
        probe.directions_ = torch.tensor(directions, dtype=torch.float32)
        probe.bias_ = torch.tensor(clf.intercept_ - directions @ arrays["mean"], dtype=torch.float32)
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

