"""The one intervention engine: every method in :mod:`wordpos.patching` describes what it changes as data and
reaches the model only through :func:`run_interventions`.

* An :class:`Edit` is one write into one hook: what to write (``source``: the source run's activation, e.g. clean
  into corrupted or another prompt's for resample ablation; ``base``: the unpatched run's own value, to freeze a
  path; ``mean``: a position-wise mean; ``zero``; ``value``: an explicit tensor named in the request) and where
  (all of the hook, one head / key-value slot, one position, or both).
* An :class:`Intervention` is a tuple of edits applied together (one patched run), optionally starting at a layer
  from the base run's cached ``resid_pre`` (``start_layer``). ``Intervention()`` is the unpatched run.
* A :class:`Request` says what to run the interventions on (token ids or cached residuals), where the written
  values come from, where to stop and what to read back (``read``, e.g. the probe metric, residuals at word ends,
  a cache of hooks, summed statistics).

The runner folds interventions into the batch axis (``[P * b, ...]``, intervention-major), applies every edit of
a hook in one vectorised index assignment per kind, and chunks by one rule: a forward holds at most
``Sizing.tokens_per_forward(device)`` tokens. It checkpoints finished groups (interventions sharing a start layer)
in one format (:class:`SweepCheckpoint`) and shows one progress bar.

Positions before a patch are not recomputed when the request carries the base run's keys/values (``kv``) and
output (``out``): with causal attention a patched run equals the base run at every position before the first one
an edit can change, so a forward starts there, on top of the base run's cached keys/values, and the base run's
output fills the positions before it. An edit at position p changes positions >= p; a whole-position ``source``
edit (and a ``mean`` one) changes positions >= ``Request.same_before``, which the caller sets to where the written
values first can differ from the base run's (activation patching: the first clean/corrupted difference; resample
ablation: the end of the prefix every prompt shares); ``base`` edits change nothing by themselves; ``zero`` writes
change every position, and so do ``value`` writes unless the request says its values equal the base run's before
``same_before`` (``values_same_before``: path patching's step 2, whose values were recorded in runs that changed
nothing before it). A forward never starts beyond the cached keys/values. Interventions of a group are run in order
of that first position, so a chunk starts as late as its earliest member allows.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import einops
import numpy as np
import torch
from torch import Tensor

from wordpos.patching.lean_route import lean_run
from wordpos.patching.sizing import Sizing
from wordpos.probing import hooks as H
from wordpos.probing.engines import Engine
from wordpos.probing.errors import ConfigError
from wordpos.probing.progress import progress_bar

Write = Literal["source", "base", "mean", "zero", "value"]
WRITES: tuple[str, ...] = ("source", "base", "mean", "zero", "value")


@dataclass(frozen=True)
class Edit:
    """Write ``write`` into hook ``hook`` at ``head`` (axis 2 of a ``[b, pos, head, d]`` hook; None = every head)
    and ``pos`` (axis 1; None = every position). ``value`` names the tensor in ``Request.values`` for
    ``write="value"``."""

    hook: str
    write: Write = "source"
    head: int | None = None
    pos: int | None = None
    value: str | None = None

    def __post_init__(self) -> None:
        if self.write not in WRITES:
            raise ConfigError(f"edit write must be one of {WRITES}, got {self.write!r}.")
        if (self.write == "value") != (self.value is not None):
            raise ConfigError(f"an edit writes a named value exactly when write='value'; got write={self.write!r}, "
                              f"value={self.value!r}.")


@dataclass(frozen=True)
class Intervention:
    """One patched run: ``edits`` applied together; the forward starts at ``start_layer`` from the base run's
    ``resid_pre`` there (None: from the token ids)."""

    edits: tuple[Edit, ...] = ()
    start_layer: int | None = None
    label: str = ""

    def __str__(self) -> str:
        return self.label or ",".join(f"{e.write}:{e.hook}" + (f".{e.head}" if e.head is not None else "") +
                                      (f"@{e.pos}" if e.pos is not None else "") for e in self.edits) or "unpatched"


Reader = Callable[[Tensor, dict[str, Tensor], int, slice], Any]
"""``read(out, cache, P, prompts)``: ``out`` is ``[P * b, ...]`` (the residual at ``stop_at_layer``), ``cache`` the
hooks in ``Request.cache`` (after the edits), ``P`` the interventions in this forward, ``prompts`` the slice of
prompts in it. Returns a Tensor, or a dict of Tensors, whose first axis is the ``P`` interventions. Keep them on
the device (the caller copies the stacked results to the host once): a copy per forward, or any read of a value,
makes the host wait for the device after every forward, so the host's work for the next forward never overlaps the
device's."""


@dataclass
class Request:
    """What to run. ``tokens`` ``[N, T]`` (always needed: the prompts, for start_layer=None) and ``resid``
    ``{layer: [N, T, d_model]}`` (the base run's ``resid_pre``, for interventions with a ``start_layer``).

    Values written: ``source`` / ``base`` ``{hook: [N, T, ...]}``; or ``source_tokens`` ``[N, T]``: the runner runs
    them (unpatched) per prompt batch and writes their activations (resample ablation: the prompts, permuted);
    ``mean`` ``{hook: [T, ...]}``; ``values`` ``{name: [N, T, ...]}``.

    ``kv``/``out``/``same_before``: the base run's keys/values at the first positions, every layer below the stop
    (:class:`~wordpos.probing.engines.split_inputs.PrefixKV`, rows ``N``, or 1 when every prompt shares them), its
    output at ``stop_at_layer`` there (``[N or 1, length, d_model]``), and the first position where a written value
    can differ from the base run's; with them, forwards skip the positions no edit can change (module docstring).
    Only for requests without ``cache`` (a cache would miss the skipped positions). ``values_same_before``: the
    ``values`` equal the base run's activations before ``same_before``, so ``value`` edits change nothing there.

    ``split_prompts``: the reader's output has a prompt axis (axis 1) and prompts may be batched
    (``combine="cat"`` concatenates along it; ``"sum"`` adds the outputs of prompt batches). Without it every
    forward holds all ``N`` prompts (the probe metric averages over all pairs)."""

    tokens: Tensor
    read: Reader
    stop_at_layer: int | None
    resid: dict[int, Tensor] = field(default_factory=dict)
    source: dict[str, Tensor] = field(default_factory=dict)
    source_tokens: Tensor | None = None
    base: dict[str, Tensor] = field(default_factory=dict)
    mean: dict[str, Tensor] = field(default_factory=dict)
    values: dict[str, Tensor] = field(default_factory=dict)
    cache: Sequence[str] = ()
    split_prompts: bool = False
    combine: Literal["cat", "sum"] = "cat"
    kv: Any = None
    out: Tensor | None = None
    same_before: int = 0
    values_same_before: bool = False

    @property
    def skips_positions(self) -> bool:
        return self.kv is not None and self.out is not None and not self.cache

    def first_changed(self, iv: Intervention) -> int:
        """The first position ``iv`` can change (``T``: none); see the module docstring."""
        T = int(self.tokens.shape[1])
        first = T
        for e in iv.edits:
            if e.pos is not None:
                first = min(first, e.pos)
            elif e.write in ("source", "mean") or (e.write == "value" and self.values_same_before):
                first = min(first, self.same_before)
            elif e.write != "base":
                first = 0
        return first


NOOP = Intervention(label="unpatched")


def _layer_of(hook: str) -> int:
    return int(hook.split(".")[1])


def _slot_source(req: Request, edit: Edit, sl: slice, src_run: dict[str, Tensor], like: Tensor, b: int) -> Tensor:
    """The ``[b, T, ...]`` tensor an edit reads from (not yet indexed by head/pos)."""
    T = like.shape[1]
    if edit.write == "source":
        if edit.hook in src_run:
            return src_run[edit.hook]
        if edit.hook not in req.source:
            raise ConfigError(f"edit writes the source run's {edit.hook} but the request has no source for it.")
        return req.source[edit.hook][sl]
    if edit.write == "base":
        if edit.hook not in req.base:
            raise ConfigError(f"edit freezes {edit.hook} to the base run but the request has no base value for it.")
        return req.base[edit.hook][sl]
    if edit.write == "mean":
        if edit.hook not in req.mean:
            raise ConfigError(f"edit writes the mean of {edit.hook} but the request has no mean for it "
                              "(wordpos.patching.ablation.head_means).")
        m = req.mean[edit.hook][:T]
        if m.shape[0] < T:  # positions no reference prompt reached: mean 0
            m = torch.cat([m, m.new_zeros((T - m.shape[0],) + tuple(m.shape[1:]))])
        return m.unsqueeze(0).expand(b, *m.shape)
    if edit.write == "zero":
        return torch.zeros((b,) + tuple(like.shape[1:]), dtype=like.dtype, device=like.device)
    raise AssertionError(edit.write)


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """A host tensor (token ids, indices) on ``device`` without stalling it: a blocking copy waits for the queue to
    drain (every forward queued so far); a non-blocking copy from pageable memory does not. Non-blocking only on
    CUDA, which stages such a copy at once: elsewhere (e.g. MPS) a temporary source may be freed before the copy
    runs."""
    return t if device.type == "cpu" else t.to(device, non_blocking=device.type == "cuda")


def _index(values: list[int], device: torch.device) -> Tensor:
    """An index tensor on ``device`` without stalling it (``torch.tensor(..., device=cuda)`` is a blocking copy)."""
    return to_device(torch.tensor(values, dtype=torch.long), device)


def apply_edits(act: Tensor, rows: Sequence[tuple[int, Edit]], P: int, req: Request, sl: slice,
                src_run: dict[str, Tensor]) -> Tensor:
    """Apply ``rows`` = ``(intervention index p, edit)`` to ``act`` ``[P * b, T, ...]`` (all at one hook): one
    vectorised index assignment per (write, value, head?, pos?) kind; whole-hook writes go first."""
    b = act.shape[0] // P
    a = einops.rearrange(act, "(p b) ... -> p b ...", p=P).clone()
    kinds: dict[tuple, list[tuple[int, Edit]]] = defaultdict(list)
    for p, e in rows:
        kinds[(e.head is not None or e.pos is not None, e.write, e.value, e.head is None, e.pos is None)].append((p, e))
    dev = a.device
    for key in sorted(kinds, key=lambda k: (k[0], str(k))):
        group = kinds[key]
        _, write, value, all_heads, all_pos = key
        p_idx = _index([p for p, _ in group], dev)
        if write == "value":  # [b, T, ...]: the same tensor for every p of this name
            S = req.values[value][sl].to(dev, a.dtype)
        else:
            S = _slot_source(req, group[0][1], sl, src_run, act, b).to(dev, a.dtype)
        heads = _index([e.head for _, e in group], dev) if not all_heads else None
        pos = _index([e.pos for _, e in group], dev) if not all_pos else None
        if all_heads and all_pos:
            a[p_idx] = S.unsqueeze(0)
        elif all_pos:  # a[p, :, :, head_p] = S[:, :, head_p]
            a[p_idx, :, :, heads] = einops.rearrange(S[:, :, heads], "b t r ... -> r b t ...")
        elif all_heads:  # a[p, :, pos_p] = S[:, pos_p]
            a[p_idx, :, pos] = einops.rearrange(S[:, pos], "b r ... -> r b ...")
        else:
            a[p_idx, :, pos, heads] = einops.rearrange(S[:, pos, heads], "b r ... -> r b ...")
    return einops.rearrange(a, "p b ... -> (p b) ...")


class SweepCheckpoint:
    """Per-group results of a run on disk, keyed by the run's config hash, so a restarted run skips finished
    groups. One format for every method: ``{key}-{group}.npy`` (a tensor result) written atomically."""

    def __init__(self, directory: str | Path | None, config: dict[str, Any]):
        self.directory = Path(directory) if directory is not None else None
        self.key = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)

    def _path(self, name: str) -> Path:
        assert self.directory is not None
        return self.directory / f"{self.key}-{name}.npy"

    def get(self, name: str) -> np.ndarray | None:
        if self.directory is None or not self._path(name).exists():
            return None
        try:
            return np.load(self._path(name))
        except (OSError, ValueError):  # a torn file from a crash: recompute it
            return None

    def put(self, name: str, values: np.ndarray) -> None:
        if self.directory is None:
            return
        from wordpos.probing.io import atomic_path

        with atomic_path(self._path(name)) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, values)


def _merge(parts: list[Any], axis: int, how: str) -> Any:
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], dict):
        return {k: _merge([p[k] for p in parts], axis, how) for k in parts[0]}
    if how == "sum":
        out = parts[0]
        for p in parts[1:]:
            out = out + p
        return out
    return torch.cat(parts, dim=axis)


def _group_name(start: int | None, ivs: Sequence[Intervention]) -> str:
    digest = hashlib.sha256("|".join(repr(iv.edits) for iv in ivs).encode()).hexdigest()[:10]
    return f"L{'tok' if start is None else start}-{len(ivs)}-{digest}"


def _launch_bound(device: torch.device) -> bool:
    """Whether small forwards on ``device`` cost their launches more than their arithmetic (any accelerator)."""
    return device.type != "cpu"


def _coalesce(groups: dict[int | None, list[int]], per: int) -> dict[int | None, list[int]]:
    """On an accelerator a small forward costs its launches, not its arithmetic: groups of interventions that start
    at different layers and together fit one forward run as one, from the earliest of their layers (the layers in
    between recompute the base run's values, unpatched). Groups that fill a forward on their own stay apart, so a
    large sweep keeps skipping the layers below its patches. Token-input groups (``None``) stay apart."""
    out: dict[int | None, list[int]] = {}
    if None in groups:
        out[None] = groups[None]
    start, acc = None, []
    for layer in sorted(k for k in groups if k is not None):
        idxs = groups[layer]
        if acc and len(acc) + len(idxs) <= per:
            acc = acc + idxs
            continue
        if acc:
            out[start] = acc
        start, acc = layer, list(idxs)
    if acc:
        out[start] = acc
    return out


def run_interventions(engine: Engine, req: Request, interventions: Sequence[Intervention], *,
                      sizing: Sizing | None = None, max_tokens: int | None = None,
                      checkpoint: SweepCheckpoint | None = None, progress: bool = True, desc: str = "patching",
                      unit: str = "run") -> Any:
    """Run ``interventions`` as ``req`` says and return the reader's outputs for all of them, in the order given
    (first axis: intervention; with ``split_prompts`` and ``combine="cat"`` second axis: prompt).

    Chunking rule: at most ``max_tokens`` (default ``sizing.tokens_per_forward(device)``) tokens per forward;
    with ``split_prompts`` a prompt batch holds ``sizing.prompts_per_batch(device)`` prompts (64 on the CPU, up to
    the budget on an accelerator; fewer when one forward of them would exceed the budget) and the interventions
    fill the rest. Interventions run grouped by start layer; on an accelerator, groups that together fit one
    forward share it (:func:`_coalesce`)."""
    if not interventions:
        raise ConfigError("no patches to run: the head/layer/position list is empty.")
    sizing = sizing or Sizing()
    budget = max_tokens or sizing.tokens_per_forward(engine.device)
    N, T = int(req.tokens.shape[0]), int(req.tokens.shape[1])
    stop = req.stop_at_layer
    groups: dict[int | None, list[int]] = defaultdict(list)
    for i, iv in enumerate(interventions):
        for e in iv.edits:
            if e.hook.startswith("blocks.") and stop is not None and _layer_of(e.hook) >= stop:
                raise ConfigError(f"patch {iv} is at or after the probe's layer; only layers < {stop} can change it.")
            if e.write == "value" and e.value not in req.values:
                raise ConfigError(f"edit {e} names value {e.value!r}, which the request does not hold.")
        if iv.start_layer is not None and iv.start_layer not in req.resid:
            raise ConfigError(f"intervention {iv} starts at layer {iv.start_layer} but the request has no resid_pre "
                              "for that layer.")
        groups[iv.start_layer].append(i)
    b = min(N, sizing.prompts_per_batch(engine.device), max(1, budget // T)) if req.split_prompts else N
    per = max(1, budget // (b * T))
    if _launch_bound(engine.device):
        groups = _coalesce(groups, per)
    if req.skips_positions:  # latest-starting chunks: order each group by the first position it can change
        firsts = [req.first_changed(iv) for iv in interventions]
        groups = defaultdict(list, {k: sorted(v, key=lambda i: firsts[i]) for k, v in groups.items()})
    prompt_slices = [slice(s, min(N, s + b)) for s in range(0, N, b)]
    results: list[Any] = [None] * len(interventions)
    bar = progress_bar(total=len(interventions) * len(prompt_slices), desc=desc, disable=not progress,
                       unit=unit if len(prompt_slices) == 1 else f"{unit}×batch")  # counts each set on each batch
    # jobs: (group, chunk of intervention indices); finished groups come from the checkpoint
    todo: dict[int | None, list[list[int]]] = {}
    names: dict[int | None, str] = {}
    for start, idxs in groups.items():
        names[start] = _group_name(start, [interventions[i] for i in idxs])
        done = checkpoint.get(names[start]) if checkpoint else None
        if done is not None and len(done) == len(idxs):
            for i, v in zip(idxs, torch.from_numpy(done)):
                results[i] = v
            bar.update(len(idxs) * len(prompt_slices))
            continue
        todo[start] = [idxs[c:c + per] for c in range(0, len(idxs), per)]
    # prompt batches outermost, so a resample source run is computed once per prompt batch for every chunk
    parts: dict[tuple[int | None, int], list[Any]] = defaultdict(list)
    need = sorted({e.hook for i in sum((sum(v, []) for v in todo.values()), []) for e in interventions[i].edits
                   if e.write == "source"}) if req.source_tokens is not None else []
    try:
        for si, sl in enumerate(prompt_slices):
            src_run = _source_run(engine, req, need, sl)
            for start, chunks in todo.items():
                for ci, chunk in enumerate(chunks):
                    parts[(start, ci)].append(_forward(engine, req, [interventions[i] for i in chunk], start, sl,
                                                       src_run))
                    bar.update(len(chunk))
                if si == len(prompt_slices) - 1:  # the group is complete: merge, checkpoint, hand out
                    outs = [_merge(parts.pop((start, ci)), 1, req.combine) for ci in range(len(chunks))]
                    merged = _merge(outs, 0, "cat") if len(outs) > 1 else outs[0]
                    if checkpoint and isinstance(merged, Tensor):
                        checkpoint.put(names[start], merged.detach().cpu().numpy())
                    for j, i in enumerate(sum(chunks, [])):
                        results[i] = {k: v[j] for k, v in merged.items()} if isinstance(merged, dict) else merged[j]
    finally:
        bar.close()
    if isinstance(results[0], dict):
        return {k: _stack([r[k] for r in results]) for k in results[0]}
    return _stack(results)


def _stack(parts: list[Tensor]) -> Tensor:
    """The results stacked where the readers left them (readers may keep them on the device, so a run makes no
    per-forward copy to the host); on the host when they lie on several devices (groups read back from a
    checkpoint are host tensors)."""
    if len({t.device for t in parts}) > 1:
        parts = [t.cpu() for t in parts]
    return torch.stack(parts)


@torch.no_grad()
def _source_run(engine: Engine, req: Request, need: Sequence[str], sl: slice) -> dict[str, Tensor]:
    """The unpatched run of ``req.source_tokens[sl]`` (e.g. the permuted prompts of resample ablation), cached at
    the hooks that ``source`` edits write."""
    if not need:
        return {}
    _, cache = engine.run(to_device(req.source_tokens[sl], engine.device), cache=list(need),
                          stop_at_layer=max(_layer_of(n) for n in need) + 1)
    return cache


@torch.no_grad()
def _forward(engine: Engine, req: Request, chunk: Sequence[Intervention], start: int | None, sl: slice,
             src_run: dict[str, Tensor]) -> Any:
    """One batched forward: ``chunk`` folded into the batch of prompts ``sl``."""
    P = len(chunk)
    p0 = min(min(req.first_changed(iv) for iv in chunk), int(req.tokens.shape[1]) - 1,
             req.kv.length) if req.skips_positions else 0
    full = req
    if p0 > 0:  # run positions p0.. on the base run's cached keys/values (module docstring)
        req, chunk = _shifted(req, p0), [replace(iv, edits=tuple(replace(e, pos=None if e.pos is None else e.pos - p0)
                                                                  for e in iv.edits)) for iv in chunk]
        src_run = {k: v[:, p0:] for k, v in src_run.items()}
    rows_by_hook: dict[str, list[tuple[int, Edit]]] = defaultdict(list)
    for p, iv in enumerate(chunk):
        for e in iv.edits:
            rows_by_hook[e.hook].append((p, e))
    if start is None:
        x = einops.repeat(to_device(req.tokens[sl], engine.device), "b t -> (p b) t", p=P)
    else:
        x = einops.repeat(req.resid[start][sl], "b t d -> (p b) t d", p=P)
        first = H.resid(start, "resid_pre")
        if first in rows_by_hook:  # the input *is* this hook: edit it directly
            x = apply_edits(x, rows_by_hook.pop(first), P, req, sl, src_run)
    hooks = [(name, lambda act, _n, rows=rows: apply_edits(act, rows, P, req, sl, src_run))
             for name, rows in rows_by_hook.items()]
    b = sl.stop - sl.start
    kw = {"past": full.kv.select(sl, p0, repeat=P, n_rows=b)} if p0 > 0 else {}
    # head-output edits (and head-output / block-input caches) only: the hook-free blocks where they apply
    # (patching.lean_route)
    got = lean_run(engine, x, hooks, stop_at_layer=req.stop_at_layer, start_at_layer=start, cache=req.cache, **kw)
    if got is not None:
        out, cache = got
    else:
        out, cache = engine.run(x, hooks=hooks, cache=list(req.cache), stop_at_layer=req.stop_at_layer,
                                start_at_layer=start, **kw)
    if p0 > 0:  # the positions before p0 are the base run's
        base = full.out[:1, :p0].expand(b, -1, -1) if full.out.shape[0] == 1 else full.out[sl][:, :p0]
        out = torch.cat([einops.repeat(base.to(out), "b t d -> (p b) t d", p=P), out], dim=1)
    return req.read(out, cache, P, sl)


def _shifted(req: Request, p0: int) -> Request:
    """``req`` seen from position ``p0`` on: every per-position tensor cut to positions ``p0..`` (views)."""
    cut = lambda d: {k: v[:, p0:] for k, v in d.items()}  # noqa: E731
    return replace(req, tokens=req.tokens[:, p0:], resid=cut(req.resid), source=cut(req.source),
                   base=cut(req.base), mean={k: v[p0:] for k, v in req.mean.items()}, values=cut(req.values),
                   source_tokens=None if req.source_tokens is None else req.source_tokens[:, p0:], kv=None, out=None)


def cache_run(engine: Engine, tokens: Tensor, names: Sequence[str], *, stop_at_layer: int | None,
              sizing: Sizing | None = None, split_prompts: bool = False, progress: bool = False,
              desc: str = "caching") -> tuple[Tensor, dict[str, Tensor]]:
    """The unpatched run of ``tokens`` through the runner: ``(out, cache of names)``, all prompts."""
    names = list(names)

    def read(out: Tensor, cache: dict[str, Tensor], P: int, _sl: slice) -> dict[str, Tensor]:
        d = {n: cache[n].unsqueeze(0) for n in names}
        d["__out__"] = out.unsqueeze(0)
        return d

    req = Request(tokens=tokens, read=read, stop_at_layer=stop_at_layer, cache=names, split_prompts=split_prompts)
    res = run_interventions(engine, req, [NOOP], sizing=sizing, progress=progress, desc=desc)
    out = res.pop("__out__")[0]
    return out, {k: v[0] for k, v in res.items()}
