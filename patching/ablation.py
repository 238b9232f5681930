"""Head ablation measured by the probe: zero, mean or resample-ablate a set of heads' outputs (``hook_z``)
and re-score the probe on held-out words. A random-heads control draws the same number of heads from
the same layers, so "these k heads matter" is read against "any k heads matter"."""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import einops
import numpy as np
import torch
from torch import Tensor

from wordpos.patching.activation import check_probe
from wordpos.patching.corruptions import derangement
from wordpos.patching.heads import parse_heads
from wordpos.patching.runner import NOOP, Edit, Intervention, Request, run_interventions, to_device
from wordpos.patching.sizing import Sizing
from wordpos.probing.progress import progress_bar
from wordpos.probing import hooks as H
from wordpos.probing.baselines import PositionBaseline
from wordpos.probing.datasets import PromptSet, WordIndexDataset
from wordpos.probing.engines import Engine, as_engine
from wordpos.probing.errors import ConfigError
from wordpos.probing.probe import WordIndexProbe
from wordpos.probing.reprs import clipped, percent, short_repr

AblationMethod = Literal["zero", "mean", "resample"]
ABLATIONS = ("zero", "mean", "resample")


ABLATION_FORMAT = "wordpos.ablation/1"


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

    def __repr__(self) -> str:
        r, rr = self.random_accuracies, self.random_refit_accuracies
        distinct = f" ({self.random_distinct_sets} distinct)" if r and self.random_distinct_sets < len(r) else ""

        def spread(xs: list[float]) -> str:
            return f"{percent(float(np.mean(xs)))} ± {100 * float(np.std(xs)):.1f}"
        return short_repr(self, [
            f"{self.method} ablation of {clipped((f'{L}.{h}' for L, h in self.heads), 8)}",
            f"held-out words {percent(self.accuracy)} (unablated {percent(self.clean_accuracy)}, position-only "
            f"{percent(self.baseline_abs_pos_accuracy)})",
            "" if self.refit_accuracy is None else f"probe refitted {percent(self.refit_accuracy)}",
            f"{len(r)} random sets{distinct} {spread(r)}" if r else "",
            f"refitted {spread(rr)}" if rr else ""])

    @property
    def drop(self) -> float:
        """Unablated minus ablated held-out accuracy (what the heads carried)."""
        return self.clean_accuracy - self.accuracy

    @property
    def gap_to_baseline(self) -> float:
        """Ablated accuracy minus the position-only baseline's (what is left beyond position)."""
        return self.accuracy - self.baseline_abs_pos_accuracy

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        r, rr = self.random_accuracies, self.random_refit_accuracies
        d.update(drop=self.drop, gap_to_baseline=self.gap_to_baseline,
                 random_mean=float(np.mean(r)) if r else None, random_std=float(np.std(r)) if r else None,
                 refit_gap_to_baseline=(self.refit_accuracy - self.baseline_abs_pos_accuracy
                                        if self.refit_accuracy is not None else None),
                 random_refit_mean=float(np.mean(rr)) if rr else None,
                 random_refit_std=float(np.std(rr)) if rr else None,
                 random_distinct_sets=self.random_distinct_sets)
        return d

    def save(self, directory: str | Path, name: str = "ablation") -> Path:
        """``{directory}/{name}.json`` (the numbers of :meth:`to_dict`), atomically; returns that file's path."""
        from wordpos.probing.io import save_record

        return save_record({"format": ABLATION_FORMAT, **self.to_dict()}, directory, name)

    @classmethod
    def load(cls, path: str | Path, name: str = "ablation") -> "AblationResult":
        """Read a result written by :meth:`save` (the ``.json`` file, or its directory)."""
        from wordpos.probing.io import load_record, record_from_dict

        def convert(d: dict[str, Any]) -> dict[str, Any]:  # JSON's lists and string keys back to tuples and ints
            d = {k: v for k, v in d.items() if k in {f.name for f in fields(cls)}}
            return {**d, "heads": [tuple(h) for h in d["heads"]],
                    "random_heads": [[tuple(h) for h in s] for s in d.get("random_heads", [])],
                    "per_word_accuracy": {int(k): v for k, v in d["per_word_accuracy"].items()}}

        return record_from_dict(cls, load_record(path, name, "ablation result"), ABLATION_FORMAT,
                                "an ablation result", "ablation", "; run the ablation again", convert)

    @property
    def random_distinct_sets(self) -> int:
        """How many of the random control's draws differ: fewer than the draws when the heads' layers hold few other
        heads (the organism's layer 1 has exactly one other pair), so that the control's spread over draws is not a
        spread over head sets."""
        return len({tuple(sorted(map(tuple, s))) for s in self.random_heads})


@torch.no_grad()
def head_means(engine: Engine, prompts: PromptSet, layers: Sequence[int], batch_size: int | None = None, *,
               length: int | None = None, sizing: Sizing | None = None) -> dict[int, Tensor]:
    """Position-wise mean of each layer's ``hook_z`` over ``prompts`` (the mean-ablation reference), counting at
    each position only the prompts that reach it; ``[length, head, d_head]`` per layer (positions no prompt
    reaches are 0). One unpatched pass through the runner, summed over prompt batches."""
    sizing = _sizing(sizing, batch_size)
    layers = sorted(set(layers))
    T = prompts.max_len()
    length = length or T
    names = [H.attn_z(L) for L in layers]
    lengths: dict[torch.device, Tensor] = {}  # the prompts' lengths where the forwards run, copied once

    def read(out: Tensor, cache: dict[str, Tensor], P: int, sl: slice) -> dict[str, Tensor]:
        if out.device not in lengths:
            lengths[out.device] = to_device(prompts.lengths, out.device)
        mask = (torch.arange(T, device=out.device)[None, :] < lengths[out.device][sl][:, None]).double()
        d = {n: torch.einsum("bthd,bt->thd", cache[n].double(), mask).unsqueeze(0) for n in names}
        d["count"] = mask.sum(0).unsqueeze(0)
        return d

    req = Request(tokens=prompts.tokens[:, :T], read=read, stop_at_layer=max(layers) + 1, cache=names,
                  split_prompts=True, combine="sum")
    sums = run_interventions(engine, req, [NOOP], sizing=sizing, progress=False, desc="head means")
    count = sums["count"][0].clamp(min=1)[:, None, None]
    out = {}
    for L, n in zip(layers, names):
        m = (sums[n][0] / count).float()
        if length > T:
            m = torch.cat([m, m.new_zeros((length - T,) + tuple(m.shape[1:]))])
        out[L] = m[:length]
    return out


def _sizing(sizing: Sizing | None, batch_size: int | None) -> Sizing:
    sizing = sizing or Sizing()
    return sizing.with_prompt_batch(batch_size) if batch_size else sizing


def ablation_intervention(heads: Sequence[tuple[int, int]], method: AblationMethod) -> Intervention:
    """The runner's form of "ablate these heads": one edit per head at its ``hook_z`` (``zero``; ``mean``: the
    position-wise mean; ``resample``: the same head of another prompt, see :func:`corruptions.derangement`)."""
    write = {"zero": "zero", "mean": "mean", "resample": "source"}[method]
    return Intervention(tuple(Edit(H.attn_z(L), write, h) for L, h in heads),
                        label="+".join(f"{L}.{h}" for L, h in heads) or "unablated")


@torch.no_grad()
def ablated_sets(engine: Engine, layer: int, prompts: PromptSet, head_sets: Sequence[Sequence[tuple[int, int]]],
                 method: AblationMethod = "mean", means: dict[int, Tensor] | None = None, *, seed: int = 0,
                 probe: WordIndexProbe | None = None, sizing: Sizing | None = None, progress: bool = False,
                 desc: str = "ablation", skip: bool = True, memo: dict | None = None) -> Tensor:
    """For each set of heads (``[]`` = none), the residual after block ``layer`` at the word-final tokens of
    ``prompts`` with those heads ablated, all sets batched through the runner: ``[set, sample, d_model]`` in
    (prompt, word) order; with ``probe``, its predictions ``[set, sample]`` instead.

    Resample ablation draws one derangement over all of ``prompts`` (seeded): prompt ``i`` gets prompt
    ``perm[i]``'s activation of the ablated head from that prompt's unablated run.

    With ``skip`` (default) forwards compute only what an ablation can change: each set starts at its first
    ablated layer from the unablated run's residual there, and resample ablation starts after the prefix every
    prompt shares, on that prefix's cached keys/values (TransformerLens, and nnsight locally); ``skip=False`` runs
    every prompt from its first token (the same numbers up to float rounding, tested). ``memo``, a dict shared by
    calls on one model, keeps the shared prefix's keys/values between them (one run of it for a stage's calls)."""
    if method not in ABLATIONS:
        raise ConfigError(f"method must be one of {ABLATIONS}, got {method!r}.")
    if method == "mean" and means is None and any(head_sets):
        raise ConfigError("mean ablation needs reference means (patching.ablation.head_means).")
    T = prompts.max_len()
    tokens = prompts.tokens[:, :T]
    prompt, pos = prompts.positions("word_final")
    at: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}  # each prompt batch's word-final tokens, on the device

    def read(out: Tensor, cache: dict[str, Tensor], P: int, sl: slice) -> Tensor:
        if (sl.start, sl.stop) not in at:
            keep = (prompt >= sl.start) & (prompt < sl.stop)
            at[sl.start, sl.stop] = (to_device(prompt[keep] - sl.start, out.device),
                                     to_device(pos[keep], out.device))
        rows, cols = at[sl.start, sl.stop]
        r = einops.rearrange(out, "(p b) t d -> p b t d", p=P)
        x = r[:, rows, cols].float()  # (stays on the device: one copy at the end, so no forward waits for the last)
        return probe.logits(x).argmax(-1) if probe is not None else x

    mean = {H.attn_z(L): m for L, m in (means or {}).items()} if method == "mean" else {}
    perm = derangement(len(prompts), seed) if method == "resample" and any(head_sets) else None
    ivs = [ablation_intervention(hs, method) for hs in head_sets]
    resid, source, ivs = _unablated_run(engine, tokens, head_sets, ivs, perm, sizing) if skip else ({}, {}, ivs)
    src = tokens[perm] if perm is not None and not source else None  # the runner runs the permuted prompts
    req = Request(tokens=tokens, read=read, stop_at_layer=layer + 1, mean=mean, source_tokens=src, source=source,
                  split_prompts=True, resid=resid, **(_shared_prefix(engine, tokens, layer + 1, memo)
                                                        if skip and method == "resample" else {}))
    return run_interventions(engine, req, ivs, sizing=sizing, progress=progress, desc=desc, unit="set").cpu()


RESID_CACHE_BYTES = 1 << 30
"""At most this much memory for the unablated activations that ablation forwards start from and resample from (one
``[prompt, pos, d_model]`` tensor per layer); beyond it the forwards start from the tokens."""


def _unablated_run(engine: Engine, tokens: Tensor, head_sets: Sequence[Sequence[tuple[int, int]]],
                   ivs: list[Intervention], perm: Tensor | None, sizing: Sizing | None
                   ) -> tuple[dict[int, Tensor], dict[str, Tensor], list[Intervention]]:
    """One unablated run of ``tokens`` that every ablated forward reuses: its ``resid_pre`` at each set's first
    ablated layer (the set starts there: blocks before it cannot change; the unablated set starts at the last of
    them), and with ``perm`` (resample ablation) its ``hook_z`` at the ablated layers, permuted, as the values
    written (prompt ``i`` gets prompt ``perm[i]``'s), so no separate run of the permuted prompts is needed.
    Returns ``(resid by layer, source by hook, interventions with their start layers)``."""
    from wordpos.patching.runner import cache_run
    from wordpos.probing.engines.base import engine_dtype

    starts = sorted({min(L for L, _ in hs) for hs in head_sets if hs} - {0})
    z_layers = sorted({L for hs in head_sets for L, _ in hs}) if perm is not None else []
    item = torch.empty(0, dtype=engine_dtype(engine) or torch.float32).element_size()
    if not (starts or z_layers) or \
            tokens.numel() * engine.dims.d_model * (len(starts) + len(z_layers)) * item > RESID_CACHE_BYTES:
        return {}, {}, ivs
    names = [H.resid(L, "resid_pre") for L in starts] + [H.attn_z(L) for L in z_layers]
    stop = max(starts + [L + 1 for L in z_layers])
    _, cache = cache_run(engine, tokens, names, stop_at_layer=stop, sizing=sizing, split_prompts=True)
    resid = {L: cache[H.resid(L, "resid_pre")] for L in starts}
    source = {H.attn_z(L): cache[H.attn_z(L)][perm.to(cache[H.attn_z(L)].device)] for L in z_layers}
    out = []
    for hs, iv in zip(head_sets, ivs):
        first = min(L for L, _ in hs) if hs else (max(starts) if starts else None)
        out.append(replace(iv, start_layer=first if first in resid else None))
    return resid, source, out


def _shared_prefix(engine: Engine, tokens: Tensor, stop: int, memo: dict | None = None) -> dict[str, Any]:
    """Request fields for the positions every prompt shares (the fixed prefix): there each prompt's head outputs
    equal every other prompt's, so resample ablation changes nothing before them. Their keys/values are computed
    once, for one row (and kept in ``memo`` for the next call with that prefix and stop), and ablated forwards
    start after them (``runner`` docstring)."""
    from wordpos.probing.engines.split_inputs import prefix_kv_unsupported, run_prefix

    differ = (tokens != tokens[:1]).any(0).nonzero()
    p = int(differ.min()) if len(differ) else int(tokens.shape[1]) - 1
    if p < 1 or prefix_kv_unsupported(engine) is not None:
        return {}
    from wordpos.probing.engines.base import engine_dtype

    key = ("shared prefix", id(getattr(engine, "model", engine)), str(engine.device), str(engine_dtype(engine)),
           tuple(tokens[0, :p].tolist()), stop)
    if memo is not None and key in memo:
        return memo[key]
    kv = run_prefix(engine, tokens[:1, :p].to(engine.device), stop, split=False)
    fields = {"kv": kv, "out": kv.resid, "same_before": p}
    if memo is not None:
        memo[key] = fields
    return fields


def ablated_residuals(engine: Engine, layer: int, prompts: PromptSet, heads: Sequence[tuple[int, int]],
                      method: AblationMethod = "mean", means: dict[int, Tensor] | None = None,
                      batch_size: int | None = None, seed: int = 0) -> Tensor:
    """Residual stream after block ``layer`` at the word-final tokens of ``prompts`` with ``heads`` ablated:
    ``[sample, d_model]`` in (prompt, word) order."""
    return ablated_sets(engine, layer, prompts, [list(heads)], method, means, seed=seed,
                        sizing=_sizing(None, batch_size))[0]


def ablated_predictions(engine: Engine, probe: WordIndexProbe, prompts: PromptSet, heads: Sequence[tuple[int, int]],
                        method: AblationMethod = "mean", means: dict[int, Tensor] | None = None,
                        batch_size: int | None = None, seed: int = 0) -> np.ndarray:
    """Probe predictions at word-final tokens of ``prompts`` with ``heads`` ablated."""
    return ablated_sets(engine, int(probe.layer), prompts, [list(heads)], method, means, seed=seed, probe=probe,
                        sizing=_sizing(None, batch_size))[0].numpy()


def refit_accuracy(engine: Engine, probe: WordIndexProbe, data: WordIndexDataset, heads: Sequence[tuple[int, int]],
                   method: AblationMethod, means: dict[int, Tensor] | None, split: str = "test",
                   batch_size: int | None = None, seed: int = 0) -> float:
    """Accuracy of a probe re-fitted on ablated activations: how much word-index information is *left*
    (the fixed probe also fails when ablation merely shifts the activations it was fitted on)."""
    layer = int(probe.layer)
    xtr = ablated_residuals(engine, layer, data.train, heads, method, means, batch_size, seed)
    xte = ablated_residuals(engine, layer, data.split(split), heads, method, means, batch_size, seed)
    return _refit_sets(probe, xtr[None], data.train.labels, xte[None], data.split(split).labels, xtr.device)[0]


def _refit_sets(probe: WordIndexProbe, xtr: Tensor, ytr: Tensor, xte: Tensor, yte: Tensor,
                device: torch.device) -> list[float]:
    """Held-out accuracy of a probe re-fitted on each set's ablated activations (``xtr``/``xte``
    ``[set, sample, d_model]``) with the torch solver on ``device`` (the run's): on an accelerator every set in one
    batched fit (``batched_lbfgs_logreg``: each set its own L-BFGS, line search and stopping rule), on the CPU one
    set at a time with torch's LBFGS (a joint fit there runs as many iterations as its slowest set needs, and its
    shared line search converges each set less tightly): ``probing.probe.auto_optimizer`` decides, as for the probe
    stage's fits. Sets with identical activations are fitted once."""
    from wordpos.probing.probe import auto_optimizer, fit_probes

    dev = device if device.type != "meta" else torch.device("cpu")
    kw = dict(device=dev, C=probe.C, model=probe.model)
    # sets whose ablated activations are identical (heads that write nothing the probe's layer keeps, e.g. ones
    # that read only the shared prefix under resample ablation) have identical refits: fit each distinct set once
    first: list[int] = []
    for i in range(len(xtr)):
        same = next((j for j in first if torch.equal(xtr[i], xtr[j]) and torch.equal(xte[i], xte[j])), None)
        first.append(i if same is None else same)
    distinct = sorted(set(first))
    if auto_optimizer(dev) == "joint":
        fitted = [fit_probes(xtr[i][None], ytr, layers=[probe.layer], **kw)[0] for i in distinct]
    else:
        fitted = fit_probes(xtr[distinct], ytr, layers=[probe.layer] * len(distinct), **kw)
    acc = {i: float(r.score(xte[i], yte)) for i, r in zip(distinct, fitted)}
    return [acc[j] for j in first]


def random_head_sets(heads: Sequence[tuple[int, int]], n: int, n_heads: int, max_layer: int, seed: int = 0
                     ) -> list[list[tuple[int, int]]]:
    """``n`` random sets of ``len(heads)`` heads for the control, drawn (seeded) from the layers of ``heads``
    and never containing a head of ``heads``. When those layers hold fewer than ``len(heads)`` other heads, the
    draw widens to every layer up to ``max_layer``; when even that is too few, ConfigError."""
    heads = sorted(set(heads))
    k = len(heads)
    under = set(heads)
    layers = sorted({L for L, _ in heads})
    pool = [(L, h) for L in layers for h in range(n_heads) if (L, h) not in under]
    if len(pool) < k:
        pool = [(L, h) for L in range(max_layer + 1) for h in range(n_heads) if (L, h) not in under]
    if len(pool) < k and n > 0:
        total = (max_layer + 1) * n_heads
        raise ConfigError(f"a random control needs {k} heads other than the {k} under test, but layers "
                          f"0..{max_layer} hold only {len(pool)} ({total} heads in all, so at most {total // 2} can be "
                          f"tested against a random set); ablate at most {total // 2} heads (--top-k) or pass "
                          "--n-random 0 (n_random=0).")
    rng = np.random.default_rng(seed)
    return [sorted(pool[i] for i in rng.choice(len(pool), size=k, replace=False)) for _ in range(n)]


def ablate_heads(model: Any, probe: WordIndexProbe, data: WordIndexDataset, heads: str | Sequence[Any], *,
                 method: AblationMethod = "mean", n_random: int = 0, split: str = "test", seed: int = 0,
                 refit: bool = True, batch_size: int | None = None, sizing: Sizing | None = None,
                 progress: bool = True, means: dict[int, Tensor] | None = None, memo: dict | None = None
                 ) -> AblationResult:
    """Ablate ``heads`` and score the probe on ``split`` (held-out words by default). With ``n_random``,
    also ablate that many random sets of as many heads drawn from the same layers, never the heads under test
    (seeded; :func:`random_head_sets`). With ``refit``, also re-fit a probe on the ablated activations
    (``refit_accuracy``): the word-index information that survives, to compare with the position-only baseline.

    The unablated run, the heads and every random set run together through the runner (folded into the batch);
    ``config["timings"]`` keeps the forward time and the refit time apart. ``means`` (mean ablation): reference
    means already computed by :func:`head_means` over ``data.train`` (layers up to the probe's, positions as long
    as the longest of train and ``split``); ``memo``: see :func:`ablated_sets`."""
    engine = as_engine(model)
    layer = check_probe(engine, probe)
    if not isinstance(data, WordIndexDataset):
        raise ConfigError(f"data must be a WordIndexDataset (its train split refits the probe, its {split!r} split is "
                          f"scored), got {type(data).__name__}.")
    if method not in ABLATIONS:
        raise ConfigError(f"method must be one of {ABLATIONS}, got {method!r}.")
    heads = parse_heads(heads, engine.dims)
    late = [f"{L}.{h}" for L, h in heads if L > layer]
    if late:
        raise ConfigError(f"heads {late} are after the probe's layer {layer} and cannot change it; pick heads in "
                          f"layers 0..{layer}.")
    if not isinstance(n_random, (int, np.integer)) or n_random < 0:
        raise ConfigError(f"n_random must be a non-negative integer (random head sets for the control), got "
                          f"{n_random!r}.")
    sizing = _sizing(sizing, batch_size)
    prompts = data.split(split)
    y = prompts.labels.numpy()
    unknown = sorted(set(np.unique(y).tolist()) - set(np.asarray(probe.classes_).tolist()))
    if unknown:
        raise ConfigError(f"the data has word indices {unknown} that the probe was not fitted on (its classes: "
                          f"{np.asarray(probe.classes_).tolist()}); generate the data with the probe's n_words.")
    length = max(prompts.max_len(), data.train.max_len())
    t0 = time.perf_counter()
    if method != "mean":
        means = None
    elif means is None:
        means = head_means(engine, data.train, list(range(layer + 1)), length=length, sizing=sizing)
    elif not set(range(layer + 1)) <= set(means) or any(int(m.shape[0]) < length for m in means.values()):
        raise ConfigError(f"means= must hold every layer 0..{layer} for {length} positions (head_means over "
                          "data.train with length= the longest prompt); leave it out to compute them.")
    memo = {} if memo is None else memo
    rand_heads = random_head_sets(heads, n_random, engine.dims.n_heads, layer, seed)
    sets = [[], heads, *rand_heads]
    x_test = ablated_sets(engine, layer, prompts, sets, method, means, seed=seed, sizing=sizing, progress=progress,
                          desc=f"{method}-ablating {len(sets) - 1} head sets", memo=memo)
    x_train = ablated_sets(engine, layer, data.train, sets[1:], method, means, seed=seed, sizing=sizing,
                           progress=progress, desc="ablated train activations (refit)", memo=memo) if refit else None
    forward_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    preds = probe.logits(x_test).argmax(-1).numpy()
    clean, pred = preds[0], preds[1]
    rand_acc = [float(np.mean(p == y)) for p in preds[2:]]
    refit_acc, rand_refit = None, []
    if refit:
        accs = _refit_sets(probe, x_train, data.train.labels, x_test[1:], prompts.labels, engine.device)
        refit_acc, rand_refit = accs[0], accs[1:]
    refit_s = time.perf_counter() - t0
    _, pos = prompts.positions("word_final")
    _, tr_pos = data.train.positions("word_final")
    base = PositionBaseline().fit(tr_pos.numpy(), data.train.labels.numpy()).score(pos.numpy(), y)
    if float(np.mean(clean == y)) <= base:
        warnings.warn(f"the probe reads {np.mean(clean == y):.1%} of these held-out words, no more than the position-"
                      f"only baseline's {base:.1%}: ablating heads cannot show word-index information beyond the "
                      "position here. Fit the probe at a better layer (sweep_layers shows each layer against the "
                      "baseline) or on more prompts.", UserWarning, stacklevel=2)
    per_word = {int(k): float(np.mean(pred[y == k] == k)) for k in np.unique(y)}
    n_tokens = int(prompts.lengths.sum()) * len(sets) + (int(data.train.lengths.sum()) * (len(sets) - 1) if refit else 0)
    return AblationResult(heads=heads, method=method, accuracy=float(np.mean(pred == y)),
                          clean_accuracy=float(np.mean(clean == y)), baseline_abs_pos_accuracy=float(base),
                          per_word_accuracy=per_word, random_accuracies=rand_acc, random_heads=rand_heads,
                          refit_accuracy=refit_acc, random_refit_accuracies=rand_refit, n_samples=int(len(y)),
                          config={"model": engine.name, "probe_layer": layer, "split": split, "seed": seed,
                                  "method": method, "n_random": n_random,
                                  "timings": {"forward_s": forward_s, "refit_s": refit_s,
                                              "ablated_tokens": n_tokens, "layers": layer + 1}})


def ablation_sweep(model: Any, probe: WordIndexProbe, data: WordIndexDataset, *, method: AblationMethod = "mean",
                   heads: Sequence[tuple[int, int]] | None = None, split: str = "test", seed: int = 0,
                   batch_size: int | None = None, sizing: Sizing | None = None, progress: bool = True) -> np.ndarray:
    """Probe accuracy with each single head ablated: ``[layer, head]`` for layers up to the probe's (only
    ``heads`` when given; the others are NaN: not measured). All heads run batched through the runner."""
    engine = as_engine(model)
    layer = check_probe(engine, probe)
    sizing = _sizing(sizing, batch_size)
    prompts = data.split(split)
    y = prompts.labels.numpy()
    length = max(prompts.max_len(), data.train.max_len())
    means = head_means(engine, data.train, list(range(layer + 1)), length=length, sizing=sizing) \
        if method == "mean" else None
    heads = parse_heads(heads, engine.dims) if heads is not None else \
        [(L, h) for L in range(layer + 1) for h in range(engine.dims.n_heads)]
    preds = ablated_sets(engine, layer, prompts, [[hd] for hd in heads], method, means, seed=seed, probe=probe,
                         sizing=sizing, progress=progress, desc=f"{method}-ablating heads").numpy()
    out = np.full((layer + 1, engine.dims.n_heads), np.nan)
    for (L, h), p in zip(heads, preds):
        out[L, h] = np.mean(p == y)
    return out


def ablation_curve(model: Any, probe: WordIndexProbe, data: WordIndexDataset, ranked: Sequence[Any],
                   ks: Sequence[int], *, method: AblationMethod = "resample", n_random: int = 2, split: str = "test",
                   seed: int = 0, batch_size: int | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Ablate the top ``k`` of ``ranked`` heads for each ``k`` in ``ks``: fixed-probe and re-fitted-probe
    accuracy against ``n_random`` random sets of ``k`` heads from the same layers, so "how far toward the
    position baseline do the best k heads take the probe" reads as a curve rather than one point."""
    ranked = parse_heads(ranked, keep_order=True)
    if not ks or min(ks) < 1 or max(ks) > len(ranked):
        raise ConfigError(f"ks must lie in 1..{len(ranked)} (the number of ranked heads), got {list(ks)}.")
    rows = []
    for k in progress_bar(sorted(set(ks)), desc="ablation curve", unit="k", disable=not progress):
        res = ablate_heads(model, probe, data, ranked[:k], method=method, n_random=n_random, split=split, seed=seed,
                           batch_size=batch_size, progress=False)
        d = res.to_dict()
        rows.append({"k": k, "heads": [f"{L}.{h}" for L, h in res.heads], "accuracy": res.accuracy,
                     "refit_accuracy": res.refit_accuracy, "clean_accuracy": res.clean_accuracy,
                     "baseline_abs_pos_accuracy": res.baseline_abs_pos_accuracy, "random_mean": d["random_mean"],
                     "random_refit_mean": d["random_refit_mean"], "random_refit_std": d["random_refit_std"],
                     "n_samples": res.n_samples})
    return rows
