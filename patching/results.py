"""Patching results that carry their axes, metric and config, and save as ``effects.npz`` + ``effects.json``.

``effects`` are **signed changes from the unpatched run** (patched − unpatched, in the method's metric), so a head
that does nothing scores 0 in either direction and rankings (:meth:`EffectResult.top_heads`) and sums over
positions mean the same thing for denoising, noising and ablation. The levels themselves, where a method has them,
are kept in ``extra["level"]`` and the unpatched level in ``config["unpatched"]``. A value that was not measured
is NaN (heatmaps draw it as missing).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from wordpos.probing.errors import ConfigError, CorruptFileError
from wordpos.probing.io import read_json, read_npz, write_json, write_npz
from wordpos.probing.reprs import array_summary, clipped, short_repr

FORMAT = "wordpos.EffectResult/2"
FORMAT_V1 = "wordpos.EffectResult/1"  # stored levels (1 = clean) and unmeasured ablation heads as 0.0
DIRECTIONS = ("denoising", "noising", "ablation")
Order = Literal["abs", "increase", "decrease"]


@dataclass
class EffectResult:
    """An array of signed changes with named axes, e.g. ``axes=("layer", "head")`` and ``effects[L, H]``.

    ``coords[axis]`` labels each index along an axis (layers, heads, absolute positions, ...). ``method`` is
    activation / path / attribution / ablation; ``metric`` names the metric (for patching the normalised probe
    metric, 1 = clean behaviour, 0 = corrupted behaviour). ``direction`` is ``denoising`` (corrupted run, clean
    activations patched in: an important head has a positive change), ``noising`` (clean run, corrupted
    activations patched in: an important head has a negative change) or ``ablation``.
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
            raise ConfigError(f"effects has {self.effects.ndim} dims but axes are {self.axes}; give one axis name "
                              "per dimension.")
        if self.direction not in DIRECTIONS:
            raise ConfigError(f"direction must be one of {DIRECTIONS}, got {self.direction!r}.")
        for i, ax in enumerate(self.axes):
            self.coords.setdefault(ax, list(range(self.effects.shape[i])))

    def __repr__(self) -> str:
        e = self.effects
        if not np.isfinite(e).any():
            top = "nothing measured"
        elif self.axes[:2] == ("layer", "head"):
            top = "largest: " + clipped((f"{t['head']} {t['effect']:+.3g}" for t in self.top_heads(3)), 3)
        else:
            i = np.unravel_index(np.nanargmax(np.abs(e)), e.shape)
            top = "largest: " + ", ".join(f"{ax} {self.coords[ax][j]}" for ax, j in zip(self.axes, i)) + f" {e[i]:+.3g}"
        return short_repr(self, [f"{self.method}, {self.direction}, {self.metric}",
                                 f"effects {array_summary(e)} over {'×'.join(self.axes)}",
                                 f"{self.n_prompts} prompts" if self.n_prompts else "", top])

    def figure(self, title: str | None = None, tokens: list[str] | None = None) -> Any:
        """The effects as a plotly heatmap (shown inline in a notebook): ``[layer, head]`` (a position axis summed,
        as :meth:`head_effects`) or ``[layer, pos]`` (``tokens``, e.g. the first prompt's, label the positions)."""
        from wordpos.patching.plots import head_heatmap, position_heatmap

        title = title or f"{self.method} ({self.direction}, {self.metric}, {self.n_prompts} prompts)"
        if self.axes[:2] == ("layer", "head"):
            colorbar = "accuracy change" if self.method == "ablation" else "change in normalised metric"
            return head_heatmap(self.head_effects(), title, colorbar)
        if self.axes == ("layer", "pos"):
            return position_heatmap(self.effects, title, tokens, "change")
        raise ConfigError(f"no figure for effects over {self.axes}: figure() draws (layer, head[, pos]) or "
                          "(layer, pos); plot .effects yourself for other axes.")

    @property
    def change(self) -> np.ndarray:
        """The signed change from the unpatched run (the same array as ``effects``)."""
        return self.effects

    def toward_source(self) -> np.ndarray:
        """The change oriented toward the source run's behaviour: ``+change`` when denoising (toward clean),
        ``−change`` when noising (toward corrupted), ``−change`` for ablation (a drop is positive). An important
        head scores positive whatever the direction."""
        return self.effects if self.direction == "denoising" else -self.effects

    def head_effects(self) -> np.ndarray:
        """``[layer, head]`` changes (summing the changes over a position axis if present; NaN where nothing
        was measured)."""
        if self.axes[:2] != ("layer", "head"):
            raise ConfigError(f"these effects are over {self.axes}, not (layer, head, ...).")
        e = self.effects
        while e.ndim > 2:
            measured = np.isfinite(e).any(-1)
            e = np.where(measured, np.nansum(e, -1), np.nan)
        return e

    def top_heads(self, k: int = 10, by_abs: bool = True, order: Order | None = None) -> list[dict[str, Any]]:
        """The ``k`` measured heads with the largest change: ``[{"head": "L.H", "layer", "index", "effect"}]``
        (``effect`` is the signed change). ``order``: ``abs`` (by |change|, the default), ``increase`` (largest
        first) or ``decrease`` (most negative first, e.g. ablation drops); ``by_abs=False`` means ``increase``."""
        order = order or ("abs" if by_abs else "increase")
        e = self.head_effects()
        key = {"abs": -np.abs(e), "increase": -e, "decrease": e}[order]
        key = np.where(np.isfinite(e), key, np.inf)  # unmeasured heads last, never ranked
        flat = np.argsort(key, axis=None, kind="stable")[:k]
        out = []
        for f in flat:
            L, H = np.unravel_index(f, e.shape)
            if not np.isfinite(e[L, H]):
                break
            out.append({"head": f"{self.coords['layer'][L]}.{self.coords['head'][H]}", "layer": int(self.coords["layer"][L]),
                        "index": int(self.coords["head"][H]), "effect": float(e[L, H])})
        return out

    def save(self, directory: str | Path) -> Path:
        """``effects.npz`` (effects and extras) and ``effects.json`` (axes, coords, method, config) in
        ``directory``, atomically; returns the directory."""
        directory = Path(directory)
        write_npz(directory / "effects.npz", effects=self.effects, **{f"extra_{k}": v for k, v in self.extra.items()})
        record = {"format": FORMAT, "values": "signed change from the unpatched run (patched - unpatched)",
                  "axes": list(self.axes), "shape": list(self.effects.shape), "method": self.method,
                  "metric": self.metric, "direction": self.direction, "n_prompts": self.n_prompts,
                  "coords": self.coords, "config": self.config, "extra": sorted(self.extra)}
        if self.axes[:2] == ("layer", "head"):
            record["top_heads"] = self.top_heads(10)
        write_json(directory / "effects.json", record)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "EffectResult":
        """Read a result written by :meth:`save`. Files of format 1 (levels) are converted to changes, with a
        warning: levels minus the unpatched level (0 denoising, 1 noising), ablation drops negated; their
        unmeasured ablation heads were saved as 0 and cannot be told apart (``config["converted_from"]``)."""
        directory = Path(directory)
        meta = read_json(directory / "effects.json", "effects description")
        fmt = meta.get("format") if isinstance(meta, dict) else None
        if fmt not in (FORMAT, FORMAT_V1):
            raise CorruptFileError(f"{directory / 'effects.json'} is not a wordpos effects file (format {fmt!r}; this "
                                   f"version reads {FORMAT} and {FORMAT_V1}); point at a directory written by "
                                   "`wordpos patch`.")
        arrays = read_npz(directory / "effects.npz", "effects array")
        effects = arrays["effects"]
        if list(effects.shape) != meta["shape"]:
            raise CorruptFileError(f"{directory / 'effects.npz'} has shape {list(effects.shape)} but effects.json says "
                                   f"{meta['shape']}; the two files are from different runs. Re-run `wordpos patch`.")
        extra = {k[len("extra_"):]: v for k, v in arrays.items() if k.startswith("extra_")}
        config = dict(meta["config"])
        if fmt == FORMAT_V1:
            warnings.warn(f"{directory} holds format-1 effects (levels); converting them to signed changes. Re-run "
                          "`wordpos patch` for NaN on unmeasured ablation heads.", stacklevel=2)
            if meta["direction"] == "ablation":
                effects = -effects  # stored the accuracy drop (clean - ablated)
            else:
                unpatched = 0.0 if meta["direction"] == "denoising" else 1.0
                extra["level"] = effects
                effects = effects - unpatched
                config["unpatched"] = unpatched
            config["converted_from"] = FORMAT_V1
        return cls(effects=effects, axes=tuple(meta["axes"]), method=meta["method"], metric=meta["metric"],
                   coords=meta["coords"], direction=meta["direction"], n_prompts=meta["n_prompts"],
                   config=config, extra=extra)
