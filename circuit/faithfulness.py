"""Faithfulness of a circuit: run the model with every head *outside* the circuit mean-ablated and ask how
much of the probe's above-baseline accuracy on held-out words survives.

``share = (acc_circuit - baseline) / (acc_full - baseline)`` with ``baseline`` the position-only classifier's
accuracy: 1 means the circuit's heads alone carry everything the probe reads beyond position; 0 means
nothing. The circuit is a set of heads: MLPs, embeddings and the heads after the probe's layer (which
cannot change it) are never ablated. ``method`` is the ablation of the heads outside the circuit (``mean``:
each head's position-wise mean output over the *train* prompts, :func:`patching.ablation.head_means`).
The accuracies are on the held-out words (``data.test``); ``share`` is NaN when the probe is no better than
the baseline (nothing to keep).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from wordpos.patching.ablation import ABLATIONS, AblationMethod, ablated_predictions, head_means
from wordpos.patching.heads import parse_heads
from wordpos.patching.activation import check_probe
from wordpos.probing.baselines import PositionBaseline
from wordpos.probing.datasets import WordIndexDataset
from wordpos.probing.engines import as_engine
from wordpos.probing.errors import ConfigError
from wordpos.probing.probe import WordIndexProbe


@dataclass
class FaithfulnessResult:
    """``share`` = (accuracy_circuit − baseline) / (accuracy_full − baseline), with the raw numbers."""

    share: float
    accuracy_circuit: float
    accuracy_full: float
    baseline_abs_pos_accuracy: float
    circuit_heads: list[str]
    ablated_heads: int
    method: str
    n_samples: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def faithfulness(model: Any, probe: WordIndexProbe, data: WordIndexDataset, circuit_heads: list[tuple[int, int]], *,
                 method: AblationMethod = "mean", batch_size: int = 64, seed: int = 0) -> FaithfulnessResult:
    """Probe accuracy on held-out words with every head outside ``circuit_heads`` (``[(L, H)]`` or ``"L.H"``
    strings; layers up to the probe's) ablated, against the full model and the position-only baseline."""
    engine = as_engine(model)
    layer = check_probe(engine, probe)
    if method not in ABLATIONS:
        raise ConfigError(f"method must be one of {ABLATIONS}, got {method!r}.")
    keep = set(parse_heads(list(circuit_heads), engine.dims)) if len(circuit_heads) else set()
    late = sorted(f"{L}.{h}" for L, h in keep if L > layer)
    if late:
        raise ConfigError(f"circuit heads {late} are after the probe's layer {layer}; a circuit for this probe holds "
                          f"heads of layers 0..{layer}.")
    outside = [(L, h) for L in range(layer + 1) for h in range(engine.dims.n_heads) if (L, h) not in keep]
    y = data.test.labels.numpy()
    means = head_means(engine, data.train, list(range(layer + 1)), batch_size) if method == "mean" else None
    full = float(np.mean(ablated_predictions(engine, probe, data.test, [], "zero", batch_size=batch_size) == y))
    circ = float(np.mean(ablated_predictions(engine, probe, data.test, outside, method, means, batch_size, seed) == y))
    _, tr_pos = data.train.positions("word_final")
    _, te_pos = data.test.positions("word_final")
    base = float(PositionBaseline().fit(tr_pos.numpy(), data.train.labels.numpy()).score(te_pos.numpy(), y))
    share = (circ - base) / (full - base) if abs(full - base) > 1e-12 else float("nan")
    return FaithfulnessResult(share=share, accuracy_circuit=circ, accuracy_full=full, baseline_abs_pos_accuracy=base,
                              circuit_heads=[f"{L}.{h}" for L, h in sorted(keep)], ablated_heads=len(outside),
                              method=method, n_samples=int(len(y)))
