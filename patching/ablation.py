"""Head ablation measured by the probe: zero, mean or resample-ablate a set of heads' outputs (``hook_z``)
and re-score the probe on held-out words. A random-heads control draws the same number of heads from
the same layers, so "these k heads matter" is read against "any k heads matter"."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from patching.activation import check_probe
from probing import hooks as H
from probing.baselines import PositionBaseline
from probing.datasets import PromptSet, WordIndexDataset
from probing.engine import Engine, as_engine
from probing.errors import ConfigError
from probing.probe import WordIndexProbe

AblationMethod = Literal["zero", "mean", "resample"]
ABLATIONS = ("zero", "mean", "resample")


def parse_heads(spec: str | Sequence[Any], dims: Any = None, keep_order: bool = False) -> list[tuple[int, int]]:
    """``"3.4,2.1"`` or ``[(3, 4), "2.1"]`` → ``[(2, 1), (3, 4)]`` (sorted, unique), validated against ``dims``
    when given. ``keep_order=True`` keeps the order given (for rankings)."""
    items = [s for s in spec.split(",") if s.strip()] if isinstance(spec, str) else list(spec)
    heads = []
    for it in items:
        if isinstance(it, str):
            try:
                L, h = (int(x) for x in it.strip().split("."))
            except ValueError:
                raise ConfigError(f"head {it!r} is not LAYER.HEAD (e.g. '3.4').") from None
        else:
            L, h = (int(x) for x in it)
        heads.append((L, h))
    if not heads:
        raise ConfigError("the head list is empty; pass heads as LAYER.HEAD, e.g. --heads 3.4,2.1.")
    if dims is not None:
        for L, h in heads:
            dims.check_head(L, h)
    return list(dict.fromkeys(heads)) if keep_order else sorted(set(heads))


@dataclass
class AblationResult:
    """Probe accuracy on held-out words with ``heads`` ablated, against the unablated accuracy, the
    position-only baseline and (optionally) random heads from the same layers."""

    heads: list[tuple[int, int]]
    method: str
    accuracy: float
    clean_accuracy: float
    baseline_abs_pos_accuracy: float
    per_word_accuracy: dict[int, float]
    random_accuracies: list[float] = field(default_factory=list)
    random_heads: list[list[tuple[int, int]]] = field(default_factory=list)
    refit_accuracy: float | None = None
    random_refit_accuracies: list[float] = field(default_factory=list)
    n_samples: int = 0
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def drop(self) -> float:
        return self.clean_accuracy - self.accuracy

    @property
    def gap_to_baseline(self) -> float:
        return self.accuracy - self.baseline_abs_pos_accuracy

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        r, rr = self.random_accuracies, self.random_refit_accuracies
        d.update(drop=self.drop, gap_to_baseline=self.gap_to_baseline,
                 random_mean=float(np.mean(r)) if r else None, random_std=float(np.std(r)) if r else None,
                 refit_gap_to_baseline=(self.refit_accuracy - self.baseline_abs_pos_accuracy
                                        if self.refit_accuracy is not None else None),
                 random_refit_mean=float(np.mean(rr)) if rr else None,
                 random_refit_std=float(np.std(rr)) if rr else None)
        return d


def _masked_position_mean(z: Tensor, lengths: Tensor) -> Tensor:
    """Mean over prompts at each position, counting only prompts that reach it: ``[pos, head, d_head]``."""
    T = z.shape[1]
    mask = (torch.arange(T, device=z.device)[None, :] < lengths.to(z.device)[:, None]).to(z.dtype)
    return torch.einsum("bthd,bt->thd", z, mask) / mask.sum(0).clamp(min=1)[:, None, None]


@torch.no_grad()
def head_means(engine: Engine, prompts: PromptSet, layers: Sequence[int], batch_size: int = 64) -> dict[int, Tensor]:
    """Position-wise mean of each layer's ``hook_z`` over ``prompts`` (the mean-ablation reference)."""
    sums: dict[int, Tensor] = {}
    counts = None
    T = prompts.max_len()
    names = [H.attn_z(L) for L in layers]
    for b0 in range(0, len(prompts), batch_size):
        toks = prompts.tokens[b0:b0 + batch_size, :T].to(engine.device)
        lengths = prompts.lengths[b0:b0 + batch_size].to(engine.device)
        _, cache = engine.run(toks, cache=names, stop_at_layer=max(layers) + 1)
        mask = (torch.arange(T, device=engine.device)[None, :] < lengths[:, None]).double()
        counts = mask.sum(0) if counts is None else counts + mask.sum(0)
        for L, n in zip(layers, names):
            s = torch.einsum("bthd,bt->thd", cache[n].double(), mask)
            sums[L] = s if L not in sums else sums[L] + s
    return {L: (s / counts.clamp(min=1)[:, None, None]).float() for L, s in sums.items()}


@torch.no_grad()
def ablated_residuals(engine: Engine, layer: int, prompts: PromptSet, heads: Sequence[tuple[int, int]],
                      method: AblationMethod = "mean", means: dict[int, Tensor] | None = None, batch_size: int = 64,
                      seed: int = 0) -> Tensor:
    """Residual stream after block ``layer`` at the word-final tokens of ``prompts`` with ``heads`` ablated:
    ``[sample, d_model]`` in (prompt, word) order."""
    by_layer: dict[int, list[int]] = {}
    for L, h in heads:
        by_layer.setdefault(L, []).append(h)
    if method == "mean" and means is None and heads:
        raise ConfigError("mean ablation needs reference means (patching.ablation.head_means).")
    g = torch.Generator().manual_seed(seed)
    out = []
    T = prompts.max_len()
    for b0 in range(0, len(prompts), batch_size):
        sub = prompts.subset(range(b0, min(b0 + batch_size, len(prompts))))
        toks = sub.tokens[:, :T].to(engine.device)
        n = toks.shape[0]
        perm = torch.randperm(n, generator=g)
        if n > 1:
            fixed = perm == torch.arange(n)
            perm[fixed] = (perm[fixed] + 1) % n
        hooks = []
        for L, hs in by_layer.items():
            idx = torch.tensor(hs, device=engine.device)

            def hook(act: Tensor, name: str, idx=idx, L=L, perm=perm) -> Tensor:
                act = act.clone()
                if method == "zero":
                    act[:, :, idx] = 0.0
                elif method == "mean":
                    act[:, :, idx] = means[L][: act.shape[1], idx].to(act.dtype)
                else:
                    act[:, :, idx] = act[perm.to(act.device)][:, :, idx]
                return act

            hooks.append((H.attn_z(L), hook))
        resid, _ = engine.run(toks, hooks=hooks, stop_at_layer=layer + 1)
        prompt, pos = sub.positions("word_final")
        out.append(resid[prompt.to(engine.device), pos.to(engine.device)].float().cpu())
    return torch.cat(out)


def ablated_predictions(engine: Engine, probe: WordIndexProbe, prompts: PromptSet, heads: Sequence[tuple[int, int]],
                        method: AblationMethod = "mean", means: dict[int, Tensor] | None = None,
                        batch_size: int = 64, seed: int = 0) -> np.ndarray:
    """Probe predictions at word-final tokens of ``prompts`` with ``heads`` ablated."""
    x = ablated_residuals(engine, int(probe.layer), prompts, heads, method, means, batch_size, seed)
    return probe.logits(x).argmax(-1).numpy()


def refit_accuracy(engine: Engine, probe: WordIndexProbe, data: WordIndexDataset, heads: Sequence[tuple[int, int]],
                   method: AblationMethod, means: dict[int, Tensor] | None, split: str = "test", batch_size: int = 64,
                   seed: int = 0) -> float:
    """Accuracy of a probe re-fitted on ablated activations: how much word-index information is *left*
    (the fixed probe also fails when ablation merely shifts the activations it was fitted on)."""
    layer = int(probe.layer)
    xtr = ablated_residuals(engine, layer, data.train, heads, method, means, batch_size, seed)
    xte = ablated_residuals(engine, layer, data.split(split), heads, method, means, batch_size, seed)
    refit = WordIndexProbe(C=probe.C, layer=layer, model=probe.model).fit(xtr, data.train.labels)
    return float(refit.score(xte, data.split(split).labels))


def ablate_heads(model: Any, probe: WordIndexProbe, data: WordIndexDataset, heads: str | Sequence[Any], *,
                 method: AblationMethod = "mean", n_random: int = 0, split: str = "test", seed: int = 0,
                 refit: bool = True, batch_size: int = 64, progress: bool = True) -> AblationResult:
    """Ablate ``heads`` and score the probe on ``split`` (held-out words by default). With ``n_random``,
    also ablate that many random sets of as many heads drawn from the same layers (seeded). With
    ``refit``, also re-fit a probe on the ablated activations (``refit_accuracy``): the word-index
    information that survives, to compare with the position-only baseline."""
    engine = as_engine(model)
    layer = check_probe(engine, probe)
    if method not in ABLATIONS:
        raise ConfigError(f"method must be one of {ABLATIONS}, got {method!r}.")
    heads = parse_heads(heads, engine.dims)
    late = [f"{L}.{h}" for L, h in heads if L > layer]
    if late:
        raise ConfigError(f"heads {late} are after the probe's layer {layer} and cannot change it; pick heads in "
                          f"layers 0..{layer}.")
    prompts = data.split(split)
    y = prompts.labels.numpy()
    layers = sorted({L for L, _ in heads})
    means = head_means(engine, data.train, list(range(layer + 1)), batch_size) if method == "mean" else None
    clean = ablated_predictions(engine, probe, prompts, [], "zero", batch_size=batch_size)
    pred = ablated_predictions(engine, probe, prompts, heads, method, means, batch_size, seed)
    _, pos = prompts.positions("word_final")
    tr_prompt, tr_pos = data.train.positions("word_final")
    base = PositionBaseline().fit(tr_pos.numpy(), data.train.labels.numpy()).score(pos.numpy(), y)
    rng = np.random.default_rng(seed)
    pool = [(L, h) for L in layers for h in range(engine.dims.n_heads)]
    rand_acc, rand_heads, rand_refit = [], [], []
    for _ in tqdm(range(n_random), desc="random-head controls", disable=not progress or n_random == 0):
        for _try in range(100):  # a draw identical to the ablated set is no control: draw again when possible
            pick = sorted(pool[i] for i in rng.choice(len(pool), size=min(len(heads), len(pool)), replace=False))
            if pick != heads:
                break
        rand_heads.append(pick)
        rand_acc.append(float(np.mean(ablated_predictions(engine, probe, prompts, pick, method, means, batch_size,
                                                          seed) == y)))
        if refit:
            rand_refit.append(refit_accuracy(engine, probe, data, pick, method, means, split, batch_size, seed))
    refit_acc = refit_accuracy(engine, probe, data, heads, method, means, split, batch_size, seed) if refit else None
    per_word = {int(k): float(np.mean(pred[y == k] == k)) for k in np.unique(y)}
    return AblationResult(heads=heads, method=method, accuracy=float(np.mean(pred == y)),
                          clean_accuracy=float(np.mean(clean == y)), baseline_abs_pos_accuracy=float(base),
                          per_word_accuracy=per_word, random_accuracies=rand_acc, random_heads=rand_heads,
                          refit_accuracy=refit_acc, random_refit_accuracies=rand_refit, n_samples=int(len(y)),
                          config={"model": engine.name, "probe_layer": layer, "split": split, "seed": seed,
                                  "method": method, "n_random": n_random})


def ablation_sweep(model: Any, probe: WordIndexProbe, data: WordIndexDataset, *, method: AblationMethod = "mean",
                   heads: Sequence[tuple[int, int]] | None = None, split: str = "test", seed: int = 0,
                   batch_size: int = 64, progress: bool = True) -> np.ndarray:
    """Probe accuracy with each single head ablated: ``[layer, head]`` for layers up to the probe's (only
    ``heads`` when given; the others are NaN)."""
    engine = as_engine(model)
    layer = check_probe(engine, probe)
    prompts = data.split(split)
    y = prompts.labels.numpy()
    means = head_means(engine, data.train, list(range(layer + 1)), batch_size) if method == "mean" else None
    heads = parse_heads(heads, engine.dims) if heads is not None else \
        [(L, h) for L in range(layer + 1) for h in range(engine.dims.n_heads)]
    out = np.full((layer + 1, engine.dims.n_heads), np.nan)
    for L, h in tqdm(heads, desc=f"{method}-ablating heads", unit="head", disable=not progress):
        out[L, h] = np.mean(ablated_predictions(engine, probe, prompts, [(L, h)], method, means, batch_size, seed) == y)
    return out


def ablation_curve(model: Any, probe: WordIndexProbe, data: WordIndexDataset, ranked: Sequence[Any],
                   ks: Sequence[int], *, method: AblationMethod = "resample", n_random: int = 2, split: str = "test",
                   seed: int = 0, batch_size: int = 64, progress: bool = True) -> list[dict[str, Any]]:
    """Ablate the top ``k`` of ``ranked`` heads for each ``k`` in ``ks``: fixed-probe and re-fitted-probe
    accuracy against ``n_random`` random sets of ``k`` heads from the same layers, so "how far toward the
    position baseline do the best k heads take the probe" reads as a curve rather than one point."""
    ranked = parse_heads(ranked, keep_order=True)
    if not ks or min(ks) < 1 or max(ks) > len(ranked):
        raise ConfigError(f"ks must lie in 1..{len(ranked)} (the number of ranked heads), got {list(ks)}.")
    rows = []
    for k in tqdm(sorted(set(ks)), desc="ablation curve", unit="k", disable=not progress):
        res = ablate_heads(model, probe, data, ranked[:k], method=method, n_random=n_random, split=split, seed=seed,
                           batch_size=batch_size, progress=False)
        d = res.to_dict()
        rows.append({"k": k, "heads": [f"{L}.{h}" for L, h in res.heads], "accuracy": res.accuracy,
                     "refit_accuracy": res.refit_accuracy, "clean_accuracy": res.clean_accuracy,
                     "baseline_abs_pos_accuracy": res.baseline_abs_pos_accuracy, "random_mean": d["random_mean"],
                     "random_refit_mean": d["random_refit_mean"], "random_refit_std": d["random_refit_std"],
                     "n_samples": res.n_samples})
    return rows
