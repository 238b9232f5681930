"""Patching results that carry their axes, metric and config, and save as ``effects.npz`` + ``effects.json``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from probing.errors import CorruptFileError
from probing.io import read_json, read_npz, write_json, write_npz

FORMAT = "wordpos.EffectResult/1"


@dataclass
class EffectResult:
    """An array of effects with named axes, e.g. ``axes=("layer", "head")`` and ``effects[L, H]``.

    ``coords[axis]`` labels each index along an axis (layers, heads, absolute positions, ...).
    ``method`` is activation / path / attribution / ablation; ``metric`` names the normalised probe
    metric (1 = clean behaviour, 0 = corrupted behaviour); ``direction`` is ``denoising`` (corrupted
    run, clean activations patched in) or ``noising`` (clean run, corrupted activations patched in).
    """

    effects: np.ndarray
    axes: tuple[str, ...]
    method: str
    metric: str
    coords: dict[str, list[Any]] = field(default_factory=dict)
    direction: str = "denoising"
    n_prompts: int = 0
    config: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.effects = np.asarray(self.effects, dtype=np.float64)
        self.axes = tuple(self.axes)
        if self.effects.ndim != len(self.axes):
            raise ValueError(f"effects has {self.effects.ndim} dims but axes are {self.axes}")
        for i, ax in enumerate(self.axes):
            self.coords.setdefault(ax, list(range(self.effects.shape[i])))

    def head_effects(self) -> np.ndarray:
        """``[layer, head]`` effects (summing a position axis if present)."""
        if self.axes[:2] != ("layer", "head"):
            raise ValueError(f"these effects are over {self.axes}, not (layer, head, ...)")
        e = self.effects
        while e.ndim > 2:
            e = e.sum(-1)
        return e

    def top_heads(self, k: int = 10, by_abs: bool = True) -> list[dict[str, Any]]:
        """The ``k`` heads with the largest effect: ``[{"head": "L.H", "layer", "index", "effect"}]``."""
        e = self.head_effects()
        order = np.argsort(-(np.abs(e) if by_abs else e), axis=None)[:k]
        out = []
        for flat in order:
            L, H = np.unravel_index(flat, e.shape)
            out.append({"head": f"{self.coords['layer'][L]}.{self.coords['head'][H]}", "layer": int(self.coords["layer"][L]),
                        "index": int(self.coords["head"][H]), "effect": float(e[L, H])})
        return out

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        write_npz(directory / "effects.npz", effects=self.effects, **{f"extra_{k}": v for k, v in self.extra.items()})
        record = {"format": FORMAT, "axes": list(self.axes), "shape": list(self.effects.shape), "method": self.method,
                  "metric": self.metric, "direction": self.direction, "n_prompts": self.n_prompts,
                  "coords": self.coords, "config": self.config, "extra": sorted(self.extra)}
        if self.axes[:2] == ("layer", "head"):
            record["top_heads"] = self.top_heads(10)
        write_json(directory / "effects.json", record)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "EffectResult":
        directory = Path(directory)
        meta = read_json(directory / "effects.json", "effects description")
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise CorruptFileError(f"{directory / 'effects.json'} is not a wordpos effects file; point at a directory "
                                   "written by `wordpos patch`.")
        arrays = read_npz(directory / "effects.npz", "effects array")
        effects = arrays["effects"]
        if list(effects.shape) != meta["shape"]:
            raise CorruptFileError(f"{directory / 'effects.npz'} has shape {list(effects.shape)} but effects.json says "
                                   f"{meta['shape']}; the two files are from different runs. Re-run `wordpos patch`.")
        extra = {k[len("extra_"):]: v for k, v in arrays.items() if k.startswith("extra_")}
        return cls(effects=effects, axes=tuple(meta["axes"]), method=meta["method"], metric=meta["metric"],
                   coords=meta["coords"], direction=meta["direction"], n_prompts=meta["n_prompts"],
                   config=meta["config"], extra=extra)
