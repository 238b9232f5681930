"""Probe evaluation: accuracy on held-out words against the position-only and shuffled-label controls,
per word index, per absolute position, and as a confusion matrix; fitted at one layer or all of them."""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from wordpos.probing.progress import progress_bar as tqdm

from wordpos.probing.activations import Residuals
from wordpos.probing.baselines import PositionBaseline, shuffled_label_accuracy
from wordpos.probing.errors import ConfigError, CorruptFileError
from wordpos.probing.io import load_record, read_json, record_from_dict, save_record, write_json
from wordpos.probing.models.registry import check_device
from wordpos.probing.probe import DEFAULT_SOLVER, NONFINITE_RESIDUALS, WordIndexProbe, decision_index, fit_probes
from wordpos.probing.reprs import clipped, percent, short_repr


@dataclass
class LayerResult:
    """How well the probe at one layer reads word index on held-out words."""

    layer: int
    accuracy: float
    val_accuracy: float
    train_accuracy: float
    baseline_abs_pos_accuracy: float
    shuffled_label_accuracy: float | None
    per_word_accuracy: dict[int, float]
    baseline_per_word_accuracy: dict[int, float]
    per_position_accuracy: dict[int, float]
    confusion: list[list[int]]
    n_train: int
    n_test: int

    @property
    def gain(self) -> float:
        return self.accuracy - self.baseline_abs_pos_accuracy

    def __repr__(self) -> str:
        return short_repr(self, [f"layer {self.layer}: held-out words {percent(self.accuracy)} vs position-only "
                                 f"{percent(self.baseline_abs_pos_accuracy)}",
                                 f"validation {percent(self.val_accuracy)}, train {percent(self.train_accuracy)}",
                                 "" if self.shuffled_label_accuracy is None
                                 else f"shuffled labels {percent(self.shuffled_label_accuracy)}",
                                 f"{self.n_train} train / {self.n_test} test samples"])

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["gain_over_baseline"] = self.gain
        return d


SWEEP_FORMAT = "wordpos.probe_sweep/1"


@dataclass
class ProbeSweep:
    """Probes at several layers with their evaluation; ``best`` is the layer with the best validation
    accuracy (validation prompts use training words, so choosing on them never peeks at the test set)."""

    results: dict[int, LayerResult]
    probes: dict[int, WordIndexProbe] = field(repr=False)
    timings: dict[str, float] = field(default_factory=dict, repr=False)  # seconds: fit_s, evaluate_s, shuffled_s

    @property
    def best_layer(self) -> int:
        """The layer with the best validation accuracy (the earliest on ties)."""
        return max(self.results, key=lambda L: (self.results[L].val_accuracy, -L))

    def figure(self, title: str = "Word-index probe accuracy by layer") -> Any:
        """Held-out accuracy by layer against the position-only baseline and the shuffled-label control (plotly)."""
        from wordpos.probing.plots import layer_curve

        if not self.results:
            raise ConfigError("this sweep has no layers to draw: fit it on at least one layer.")
        best = self.best
        return layer_curve({L: r.accuracy for L, r in self.results.items()}, best.baseline_abs_pos_accuracy,
                           title=title, shuffled=best.shuffled_label_accuracy,
                           per_layer_val={L: r.val_accuracy for L, r in self.results.items()})

    def __repr__(self) -> str:
        if not self.results:
            return short_repr(self, ["no layers"])
        return short_repr(self, [f"{len(self.results)} layers", f"best {self.best!r}",
                                 "held-out by layer " + clipped((f"{L}: {percent(r.accuracy)}"
                                                                 for L, r in sorted(self.results.items())), 8)])

    @property
    def best(self) -> LayerResult:
        return self.results[self.best_layer]

    def save(self, directory: str | Path) -> Path:
        """Every layer's probe and evaluation (``layer{L}/``, the sweep checkpoint's format) and ``sweep.json``
        (the layers, the seconds), in ``directory``; returns it. :meth:`load` reads it back."""
        directory = Path(directory)
        (directory / "sweep.json").unlink(missing_ok=True)  # written last: a half-written save is no sweep
        for old in directory.glob("layer*"):  # an older sweep's other layers would read as this one's checkpoint
            if old.is_dir() and old.name[5:].isdigit() and int(old.name[5:]) not in self.results:
                shutil.rmtree(old)
        for L in self.results:
            _save_layer(directory / f"layer{L}", self.results[L], self.probes[L])
        save_record({"format": SWEEP_FORMAT, "layers": sorted(self.results), "timings": self.timings}, directory,
                    "sweep")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "ProbeSweep":
        """Read a sweep written by :meth:`save`."""
        directory = Path(directory)

        def convert(d: dict[str, Any]) -> dict[str, Any]:  # the listed layers, each from its folder
            layers = {int(L): _read_layer(directory / f"layer{int(L)}") for L in d["layers"]}
            return {"results": {L: r for L, (r, _) in layers.items()}, "probes": {L: p for L, (_, p) in layers.items()},
                    "timings": dict(d.get("timings", {}))}

        return record_from_dict(cls, load_record(directory, "sweep", "probe sweep"), SWEEP_FORMAT, "a probe sweep",
                                "sweep", "; save the sweep again", convert)

    def metrics(self, model_name: str) -> dict[str, Any]:
        """The ``metrics.json`` record: best layer's numbers plus the per-layer curve."""
        best = self.best
        return {
            "model": model_name,
            "layer": best.layer,
            "accuracy": best.accuracy,
            "baseline_abs_pos_accuracy": best.baseline_abs_pos_accuracy,
            "gain_over_baseline": best.gain,
            "shuffled_label_accuracy": best.shuffled_label_accuracy,
            "val_accuracy": best.val_accuracy,
            "per_word_accuracy": best.per_word_accuracy,
            "baseline_per_word_accuracy": best.baseline_per_word_accuracy,
            "per_position_accuracy": best.per_position_accuracy,
            "confusion": best.confusion,
            "per_layer_accuracy": {L: r.accuracy for L, r in sorted(self.results.items())},
            "per_layer_val_accuracy": {L: r.val_accuracy for L, r in sorted(self.results.items())},
            "n_train": best.n_train,
            "n_test": best.n_test,
            "layers": {L: r.to_dict() for L, r in sorted(self.results.items())},
        }


def confusion_counts(y_true: np.ndarray, y_pred: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """scikit-learn's ``confusion_matrix(y_true, y_pred, labels=labels)`` (rows: true label, columns: predicted;
    samples with a label outside ``labels`` left out) by one ``bincount``: a sweep builds one per layer, and
    scikit-learn's input validation cost ~2.4 ms of each (a tenth of a layer's evaluation)."""
    labels = np.asarray(labels)
    order = np.argsort(labels, kind="stable")
    srt = labels[order]
    K = len(labels)

    def index(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        v = np.asarray(v)
        i = np.clip(np.searchsorted(srt, v), 0, max(K - 1, 0))
        return order[i] if K else i, (srt[i] == v) if K else np.zeros(len(v), bool)

    t, t_ok = index(y_true)
    p, p_ok = index(y_pred)
    ok = t_ok & p_ok
    return np.bincount(t[ok] * K + p[ok], minlength=K * K).reshape(K, K)


def _per_group(pred: np.ndarray, y: np.ndarray, groups: np.ndarray) -> dict[int, float]:
    return {int(g): float(np.mean(pred[groups == g] == y[groups == g])) for g in np.unique(groups)}


def position_baseline_predictions(residuals: Residuals) -> np.ndarray:
    """The position-only classifier's predictions on the test split (fitted on the training split): the same
    for every layer, so a sweep computes them once."""
    base = PositionBaseline().fit(residuals.abs_pos["train"], residuals.labels["train"])
    return base.predict(residuals.abs_pos["test"])


def layer_predictions(residuals: Residuals, probes: dict[int, WordIndexProbe],
                      splits: Sequence[str] = ("test", "val", "train"), max_bytes: int = 1 << 28
                      ) -> dict[int, dict[str, np.ndarray]] | None:
    """Every layer's predicted word indices on each split, computed where residuals kept on a device are, in
    batched products over the layers with one copy of the predictions back per split: scored one layer and split
    at a time, a sweep over residuals kept on a GPU makes ~90 calls, each with four small uploads of the probe and
    a wait for its result. The arithmetic of :class:`WordIndexProbe`'s device path (float64, standardisation and
    weights as fitted; argmax, or decision > 0 for two classes), with the host path's refusals (an empty split; NaN
    or inf residuals). ``None`` (score layer by layer) when the residuals are host arrays or the probes do not share
    their classes and width. ``max_bytes`` bounds the float64 block of standardised residuals made at once (it and
    its decision values are the only large tensors alive).
    """
    layers = sorted(probes)
    present = [s for s in splits if s in residuals.data]
    if not layers or not present or not all(isinstance(residuals.data[s], torch.Tensor) for s in present):
        return None
    first = probes[layers[0]]
    if any(not np.array_equal(probes[L].classes_, first.classes_) or probes[L].n_features_in_ != first.n_features_in_
           for L in layers) or residuals.d_model != first.n_features_in_:
        return None
    missing = [L for L in layers if L not in residuals.layers]
    if missing:
        raise ConfigError(f"probes for layer(s) {missing}, which these residuals do not hold (layers "
                          f"{residuals.layers}); pass probes of collected layers.")
    dev = residuals.data[present[0]].device
    d = first.n_features_in_

    def stack(get: Any) -> torch.Tensor:  # one upload per attribute (fitted probes keep float64 arrays for all)
        return torch.as_tensor(np.stack([get(probes[L]) for L in layers]), dtype=torch.float64, device=dev)

    mean, scale = stack(lambda p: p.scaler_.mean_), stack(lambda p: p.scaler_.scale_)  # [layer, d]
    coef_t = stack(lambda p: p.coef_).transpose(1, 2)  # [layer, d, k]
    icpt = stack(lambda p: p.intercept_)  # [layer, k]
    cols = [residuals.layers.index(L) for L in layers]
    classes = np.asarray(first.classes_)
    out: dict[int, dict[str, np.ndarray]] = {L: {} for L in layers}
    for split in present:
        X = residuals.data[split]  # [sample, every collected layer, d]
        n = X.shape[0]
        if n == 0:
            raise ConfigError(f"no residual vectors to score in the {split!r} split (0 samples); is the split empty?")
        step = max(1, max_bytes // max(n * d * 8, 1))
        parts = []
        for s0 in range(0, len(layers), step):
            sl = slice(s0, s0 + step)
            Z = torch.empty(len(cols[sl]), n, d, dtype=torch.float64, device=dev)  # [layer, sample, d]: one block
            for j, c in enumerate(cols[sl]):
                Z[j].copy_(X[:, c])
            Z.sub_(mean[sl, None]).div_(scale[sl, None])
            dec = torch.baddbmm(icpt[sl, None], Z, coef_t[sl])  # [layer, sample, k]
            del Z
            idx = decision_index(dec)  # (WordIndexProbe.predict's rule)
            parts.append(idx.masked_fill_(~torch.isfinite(dec).all(-1), -1))  # -1: a NaN or inf residual
            del dec
        idx = torch.cat(parts, 0).cpu().numpy()  # [layer, sample]: the one wait for this split
        if (idx < 0).any():
            raise ConfigError(NONFINITE_RESIDUALS)
        for j, L in enumerate(layers):
            out[L][split] = classes[idx[j]]
    return out


def evaluate_layer(residuals: Residuals, layer: int, probe: WordIndexProbe | None = None, *,
                   shuffled_control: bool = True, seed: int = 0, baseline_pred: np.ndarray | None = None,
                   predictions: dict[str, np.ndarray] | None = None,
                   **probe_params: Any) -> tuple[LayerResult, WordIndexProbe]:
    """Fit (unless given) and evaluate the probe at ``layer`` on the held-out-word test split. Each split is
    predicted once; every accuracy, per-group accuracy and the confusion matrix are read from those
    predictions. ``baseline_pred``: :func:`position_baseline_predictions`, when the caller already has them;
    ``predictions``: the given probe's predictions per split (:func:`layer_predictions`), when the caller has
    them (splits it lacks are predicted here)."""
    ytr, yte = residuals.labels["train"], residuals.labels["test"]
    have = (predictions or {}) if probe is not None else {}  # (predictions are of the given probe)
    for split, p in have.items():
        if split in residuals.labels and len(p) != len(residuals.labels[split]):
            raise ConfigError(f"predictions[{split!r}] holds {len(p)} predictions for {len(residuals.labels[split])} "
                              f"{split} samples; pass layer_predictions(residuals, probes)[{layer}] of these "
                              "residuals.")
    # the residuals are read (a copy each) only where something still needs them
    need_x = probe is None or shuffled_control or not {"train", "test"} <= have.keys()
    Xtr, Xte = (residuals.train(layer), residuals.test(layer)) if need_x else (None, None)
    params = {"layer": layer, "site": residuals.kind, "model": residuals.model_name, **probe_params}
    if probe is None:
        probe = WordIndexProbe(**params).fit(Xtr, ytr)
    pred = have["test"] if "test" in have else probe.predict(Xte)
    base_pred = position_baseline_predictions(residuals) if baseline_pred is None else np.asarray(baseline_pred)
    if len(base_pred) != len(yte):
        raise ConfigError(f"baseline_pred has {len(base_pred)} predictions for {len(yte)} test samples; pass "
                          "position_baseline_predictions(residuals) of these residuals.")
    if "val" not in residuals.data:
        val_acc = float("nan")
    elif "val" in have:
        val_acc = float(np.mean(have["val"] == residuals.labels["val"]))
    else:
        val_acc = float(probe.score(residuals.val(layer), residuals.labels["val"]))
    shuffled = (shuffled_label_accuracy(lambda: WordIndexProbe(**params), Xtr, ytr, Xte, yte, seed=seed)
                if shuffled_control else None)
    labels = np.unique(np.concatenate([ytr, yte]))
    result = LayerResult(
        layer=layer,
        accuracy=float(np.mean(pred == yte)),
        val_accuracy=val_acc,
        train_accuracy=float(np.mean(have["train"] == ytr)) if "train" in have else float(probe.score(Xtr, ytr)),
        baseline_abs_pos_accuracy=float(np.mean(base_pred == yte)),
        shuffled_label_accuracy=shuffled,
        per_word_accuracy=_per_group(pred, yte, yte),
        baseline_per_word_accuracy=_per_group(base_pred, yte, yte),
        per_position_accuracy=_per_group(pred, yte, residuals.abs_pos["test"]),
        confusion=confusion_counts(yte, pred, labels).tolist(),
        n_train=int(len(ytr)),
        n_test=int(len(yte)),
    )
    return result, probe


def _save_layer(directory: Path, result: LayerResult, probe: WordIndexProbe) -> None:
    """A layer's probe and ``result.json`` in ``directory`` (the result written last: it marks the layer done)."""
    probe.save(directory)
    write_json(directory / "result.json", result.to_dict())


def _read_layer(directory: Path) -> tuple[LayerResult, WordIndexProbe]:
    """A layer written by :func:`_save_layer`; a missing or damaged one is a CorruptFileError naming it."""
    try:
        d = read_json(directory / "result.json", "layer result")
        d.pop("gain_over_baseline", None)
        for k in ("per_word_accuracy", "baseline_per_word_accuracy", "per_position_accuracy"):
            d[k] = {int(i): v for i, v in d[k].items()}
        return LayerResult(**d), WordIndexProbe.load(directory)
    except (KeyError, TypeError, ValueError, AttributeError, OSError) as e:
        raise CorruptFileError(f"{directory} does not hold a fitted layer ({type(e).__name__}: {e}); fit it again "
                               "(sweep_layers).") from None


def _load_layer(directory: Path) -> tuple[LayerResult, WordIndexProbe] | None:
    """A layer fitted by an earlier, interrupted sweep (``None`` when absent or unreadable)."""
    if not (directory / "result.json").exists():
        return None
    try:
        return _read_layer(directory)
    except CorruptFileError:
        return None


def _layer_groups(layers: list[int], bytes_per_layer: int, device: torch.device) -> list[list[int]]:
    """Layers fitted together by the torch solver. On an accelerator: as many as fit in a quarter of its
    free memory (one batched optimisation is launch-bound there, so fewer, larger fits win). On the CPU:
    one at a time — the fit is compute-bound there, and a joint L-BFGS runs as many iterations as its
    slowest layer needs for every layer (measured slower than per-layer fits on 2 cores)."""
    try:
        from wordpos.probing.engines.memory import free_memory_bytes
        free = free_memory_bytes(device)
    except ImportError:  # pragma: no cover
        free = None
    if free is None:
        return [[L] for L in layers]
    per = max(int(free * 0.25 // max(bytes_per_layer, 1)), 1)
    return [layers[i:i + per] for i in range(0, len(layers), per)]


def fit_layers(residuals: Residuals, layers: list[int], *, device: str | torch.device | None = None,
               **probe_params: Any) -> dict[int, WordIndexProbe]:
    """Fit the probe at each of ``layers`` on the training split. The torch solver fits groups of layers
    in one batched optimisation on ``device`` (default: where the residuals are kept, else CUDA when present, else
    the CPU); sklearn, one by one."""
    params = {"site": residuals.kind, "model": residuals.model_name, **probe_params}
    ytr = residuals.labels["train"]
    if params.get("solver", DEFAULT_SOLVER) != "torch":
        return {L: WordIndexProbe(layer=L, **params).fit(residuals.train(L), ytr) for L in layers}
    kept = residuals.data["train"]
    if device is None and isinstance(kept, torch.Tensor):
        device = kept.device
    dev = torch.device(check_device(device))
    n, d = kept.shape[0], residuals.d_model
    probes: dict[int, WordIndexProbe] = {}
    # float64 X, Z and a temporary; the batched solver's preconditioner and its temporaries, three [d + 1, d + 1]
    for group in _layer_groups(list(layers), n * d * 8 * 3 + (d + 1) ** 2 * 8 * 3, dev):
        X = torch.stack([residuals.train(L) for L in group]).to(dev)
        for L, probe in zip(group, fit_probes(X, ytr, layers=group, device=dev, **params)):
            probes[L] = probe
        del X
    return probes


def sweep_layers(residuals: Residuals, layers: list[int] | None = None, *, shuffled_control: str = "best",
                 seed: int = 0, progress: bool = True, checkpoint_dir: str | Path | None = None,
                 device: str | torch.device | None = None, **probe_params: Any) -> ProbeSweep:
    """Fit and evaluate a probe at every layer of ``residuals``. The shuffled-label control is fitted at
    the best layer only (``shuffled_control="best"``), at every layer (``"all"``) or never (``"none"``).
    With ``checkpoint_dir``, each layer is saved as it is fitted and a restarted sweep skips finished layers.
    With the torch solver (``solver="torch"``) the layers are fitted in batched optimisations on ``device``
    (see :func:`fit_layers`) before they are evaluated."""
    layers = layers or residuals.layers
    results, probes = {}, {}
    done: dict[int, tuple[LayerResult, WordIndexProbe]] = {}
    if checkpoint_dir is not None:
        for L in layers:
            got = _load_layer(Path(checkpoint_dir) / f"layer{L}")
            if got is not None:
                done[L] = got
    todo = [L for L in layers if L not in done]
    solver = probe_params.get("solver", DEFAULT_SOLVER)
    fitted: dict[int, WordIndexProbe] = {}
    t0 = time.perf_counter()
    if solver == "torch" and todo:
        fitted = fit_layers(residuals, todo, device=device, **probe_params)
    timings = {"fit_s": time.perf_counter() - t0}  # (sklearn fits each layer inside the evaluation loop)
    t0 = time.perf_counter()
    if solver == "torch" and device is not None:
        probe_params = {**probe_params, "device": str(device)}
    base_pred = position_baseline_predictions(residuals)
    # residuals kept on a device: every fitted layer's predictions in batched products, one wait per split
    preds = layer_predictions(residuals, fitted) if fitted else None
    for L in tqdm(layers, desc="probes", unit="layer", disable=not progress):
        if L in done:
            results[L], probes[L] = done[L]
            continue
        results[L], probes[L] = evaluate_layer(residuals, L, fitted.get(L), shuffled_control=shuffled_control == "all",
                                               seed=seed, baseline_pred=base_pred,
                                               predictions=(preds or {}).get(L), **probe_params)
        if checkpoint_dir is not None:
            ckpt = Path(checkpoint_dir) / f"layer{L}"
            _save_layer(ckpt, results[L], probes[L])
    timings["evaluate_s"] = time.perf_counter() - t0
    sweep = ProbeSweep(results=results, probes=probes, timings=timings)
    if shuffled_control == "best":
        t0 = time.perf_counter()
        best = sweep.best_layer
        results[best], _ = evaluate_layer(residuals, best, probes[best], shuffled_control=True, seed=seed,
                                          baseline_pred=base_pred, predictions=(preds or {}).get(best),
                                          **probe_params)
        timings["shuffled_s"] = time.perf_counter() - t0
    return sweep
