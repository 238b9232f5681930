"""The one batched patching engine: many patches per forward pass.

Each patch is a small frozen :class:`Patch` (site, layer, head, pos). Patches at the same site and layer
run together: the patch index is folded into the batch (``[P * batch, ...]``), the forward starts at the
patched layer from the cached base residual (``start_at_layer``) and stops at the probe's layer
(``stop_at_layer``), and every patch is written by one vectorised index assignment (no Python loop or
``.item()`` per patch). Finished groups are checkpointed so an interrupted sweep resumes.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import einops
import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from patching.metrics import ProbeMetric
from probing import hooks as H
from probing.engine import Engine
from probing.errors import ConfigError

Site = Literal["z", "resid_pre", "attn_out", "mlp_out"]
SITES: tuple[str, ...] = ("z", "resid_pre", "attn_out", "mlp_out")


@dataclass(frozen=True)
class Patch:
    """Replace the activation at ``site`` of ``layer`` (one ``head`` for ``z``; one ``pos`` or all
    positions when ``pos`` is None) with the source run's activation."""

    site: Site
    layer: int
    head: int | None = None
    pos: int | None = None

    def hook_name(self) -> str:
        return {"z": H.attn_z, "resid_pre": lambda L: H.resid(L, "resid_pre"), "attn_out": H.attn_out,
                "mlp_out": H.mlp_out}[self.site](self.layer)

    def __str__(self) -> str:
        head = f".{self.head}" if self.head is not None else ""
        pos = f"@{self.pos}" if self.pos is not None else ""
        return f"{self.site}:{self.layer}{head}{pos}"


def source_names(patches: Sequence[Patch]) -> list[str]:
    return sorted({p.hook_name() for p in patches})


def base_resid_names(layers: Sequence[int]) -> list[str]:
    return [H.resid(L, "resid_pre") for L in sorted(set(layers))]


def _group_key(p: Patch) -> tuple[str, int, bool]:
    return (p.site, p.layer, p.pos is None)


def _apply(act: Tensor, src: Tensor, patches: Sequence[Patch], batch: int) -> Tensor:
    """Write each patch's source slice into its copy of the batch. ``act`` is ``[P * batch, pos, ...]``,
    ``src`` is ``[batch, pos, ...]``; all patches share site, layer and pos-mode."""
    a = einops.rearrange(act, "(p b) ... -> p b ...", b=batch).clone()
    P = len(patches)
    p_idx = torch.arange(P, device=act.device)
    site, all_pos = patches[0].site, patches[0].pos is None
    if site == "z":
        heads = torch.tensor([p.head for p in patches], device=act.device)
        if all_pos:
            # a[p, :, :, head_p] = src[:, :, head_p]
            a[p_idx, :, :, heads] = einops.rearrange(src[:, :, heads], "b t p d -> p b t d").to(a.dtype)
        else:
            pos = torch.tensor([p.pos for p in patches], device=act.device)
            a[p_idx, :, pos, heads] = einops.rearrange(src[:, pos, heads], "b p d -> p b d").to(a.dtype)
    else:
        if all_pos:
            a[:] = src.unsqueeze(0).to(a.dtype)
        else:
            pos = torch.tensor([p.pos for p in patches], device=act.device)
            a[p_idx, :, pos] = einops.rearrange(src[:, pos], "b p d -> p b d").to(a.dtype)
    return einops.rearrange(a, "p b ... -> (p b) ...")


class SweepCheckpoint:
    """Per-group results of a sweep on disk, keyed by the sweep's config hash, so a restarted sweep
    skips finished groups. Each group file is written atomically."""

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
        from probing.io import atomic_path

        with atomic_path(self._path(name)) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, values)


def run_patches(
    engine: Engine,
    base: Tensor,
    source_cache: dict[str, Tensor],
    base_resid: dict[str, Tensor],
    patches: Sequence[Patch],
    metric: ProbeMetric,
    *,
    stop_at_layer: int,
    max_tokens: int | None = None,
    checkpoint: SweepCheckpoint | None = None,
    progress: bool = True,
    desc: str = "patching",
) -> Tensor:
    """Normalised metric for each patch, in the order given. ``base`` are the token ids of the run
    being patched; ``source_cache`` holds the activations patched in; ``base_resid`` the base run's
    ``resid_pre`` at every patched layer (where each group's forward starts)."""
    if not patches:
        raise ConfigError("no patches to run: the head/layer/position list is empty.")
    B = base.shape[0]
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, p in enumerate(patches):
        if p.site not in SITES:
            raise ConfigError(f"unknown patch site {p.site!r}; use one of {SITES}.")
        if p.layer >= stop_at_layer:
            raise ConfigError(f"patch {p} is at or after the probe's layer; only layers < {stop_at_layer} can change it.")
        groups[_group_key(p)].append(i)
    out = torch.empty(len(patches), dtype=torch.float64)
    per_chunk = max(1, (max_tokens or default_max_tokens(engine)) // (B * base.shape[1]))
    bar = tqdm(total=len(patches), desc=desc, unit="patch", disable=not progress)
    for key, idxs in groups.items():
        name = f"{key[0]}-L{key[1]}-{'all' if key[2] else 'pos'}-{len(idxs)}"
        done = checkpoint.get(name) if checkpoint else None
        if done is not None and len(done) == len(idxs):
            out[idxs] = torch.from_numpy(done)
            bar.update(len(idxs))
            continue
        site, layer, _ = key
        vals = []
        for c0 in range(0, len(idxs), per_chunk):
            chunk = [patches[i] for i in idxs[c0:c0 + per_chunk]]
            P = len(chunk)
            hook_name = chunk[0].hook_name()
            src = source_cache[hook_name]
            resid_in = einops.repeat(base_resid[H.resid(layer, "resid_pre")], "b t d -> (p b) t d", p=P)
            hooks = []
            if site == "resid_pre":
                resid_in = _apply(resid_in, src, chunk, B)
            else:
                hooks.append((hook_name, lambda act, _n, chunk=chunk, src=src: _apply(act, src, chunk, B)))
            resid, _ = engine.run(resid_in, hooks=hooks, start_at_layer=layer, stop_at_layer=stop_at_layer)
            vals.append(metric(resid).detach().double().cpu())
            bar.update(P)
        group_vals = torch.cat(vals)
        out[idxs] = group_vals
        if checkpoint:
            checkpoint.put(name, group_vals.numpy())
    bar.close()
    return out


def default_max_tokens(engine: Engine) -> int:
    """Tokens per patched forward: small on CPU, where cache-sized batches run fastest (measured in
    scripts/bench_patching.py), large on accelerators."""
    return 4096 if engine.device.type == "cpu" else 1 << 18


def patch_config(**kw: Any) -> dict[str, Any]:
    """A JSON-able record of a sweep's settings (dataclasses expanded)."""
    return {k: asdict(v) if hasattr(v, "__dataclass_fields__") else v for k, v in kw.items()}
