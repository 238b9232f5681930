"""Metrics from the probe, read at the target tokens of clean/corrupted pairs.

All are normalised: ``(m - m_corrupted) / (m_clean - m_corrupted)``, so **1 = clean behaviour** (the
probe reads the clean word index as it does on the clean prompt) and **0 = corrupted behaviour**.
- ``logit_diff``: probe logit of the clean index minus that of the corrupted index (differentiable).
- ``projection``: the residual's projection on the clean index's unit probe direction (differentiable).
- ``accuracy``: share of targets the probe assigns the clean index (not differentiable).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import einops
import torch
from jaxtyping import Float
from torch import Tensor

from wordpos.patching.corruptions import PatchingPairs
from wordpos.probing.errors import ConfigError
from wordpos.probing.reprs import short_repr
from wordpos.probing.probe import WordIndexProbe

MetricKind = Literal["logit_diff", "projection", "accuracy"]
METRICS: tuple[str, ...] = ("logit_diff", "projection", "accuracy")


@dataclass
class ProbeMetric:
    """A probe metric bound to a batch of pairs. ``raw(resid)`` takes the residual stream at the probe's
    layer for ``P`` stacked copies of the batch (``[P * batch, pos, d_model]``) and returns ``[P]``;
    ``__call__`` returns the normalised value once :meth:`calibrate` has set the clean/corrupted ends."""

    probe: WordIndexProbe
    pairs: PatchingPairs
    kind: MetricKind = "logit_diff"
    clean_value: float | None = None
    corrupted_value: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in METRICS:
            raise ConfigError(f"metric must be one of {METRICS}, got {self.kind!r}.")
        n_classes = len(self.probe.classes_)
        top = int(max(self.pairs.clean_labels.max(), self.pairs.corrupted_labels.max()))
        if top >= n_classes:
            raise ConfigError(f"the pairs use word index {top} but the probe knows {n_classes} indices (0..{n_classes - 1}); "
                              "build pairs with n_words equal to the probe's number of words.")

    @property
    def name(self) -> str:
        return f"probe_{self.kind}"

    def __repr__(self) -> str:
        ends = ("uncalibrated" if self.clean_value is None or self.corrupted_value is None
                else f"clean {self.clean_value:.4g}, corrupted {self.corrupted_value:.4g} (normalised to 1 and 0)")
        return short_repr(self, [self.name, f"probe layer {self.probe.layer}", f"{len(self.pairs)} pairs", ends])

    def per_target(self, resid: Float[Tensor, "rows pos d_model"]) -> Float[Tensor, "copies batch target"]:
        B = len(self.pairs)
        if resid.shape[0] % B:
            raise ConfigError(f"residual batch {resid.shape[0]} is not a multiple of the {B} pairs.")
        r = einops.rearrange(resid, "(p b) t d -> p b t d", b=B)
        pos = self.pairs.target_pos.to(r.device)
        idx = einops.repeat(pos, "b k -> p b k d", p=r.shape[0], d=r.shape[-1])
        x = torch.gather(r, 2, idx)  # [p, b, k, d]
        clean = self.pairs.clean_labels.to(r.device)
        corr = self.pairs.corrupted_labels.to(r.device)
        if self.kind == "projection":
            W = self.probe.directions_.to(r.device, r.dtype)
            unit = W / W.norm(dim=-1, keepdim=True)
            return torch.einsum("pbkd,bkd->pbk", x, unit[clean])
        logits = self.probe.logits(x)  # [p, b, k, c]
        if self.kind == "logit_diff":
            lc = torch.gather(logits, -1, einops.repeat(clean, "b k -> p b k 1", p=r.shape[0]))[..., 0]
            lr = torch.gather(logits, -1, einops.repeat(corr, "b k -> p b k 1", p=r.shape[0]))[..., 0]
            return lc - lr
        return (logits.argmax(-1) == clean).to(r.dtype)

    def raw(self, resid: Float[Tensor, "rows pos d_model"]) -> Float[Tensor, " copies"]:
        vals = self.per_target(resid)
        mask = self.pairs.target_mask.to(vals.device).to(vals.dtype)
        return (vals * mask).sum((1, 2)) / mask.sum()

    def normalize(self, raw: Tensor) -> Tensor:
        if self.clean_value is None or self.corrupted_value is None:
            raise RuntimeError("call calibrate() first: the metric needs its clean and corrupted values.")
        span = self.clean_value - self.corrupted_value
        if abs(span) < 1e-9:
            raise ConfigError("the probe reads the same on clean and corrupted prompts (no effect to patch); use a "
                              "probe that beats the position baseline, or another layer.")
        return (raw - self.corrupted_value) / span

    def __call__(self, resid: Float[Tensor, "rows pos d_model"]) -> Float[Tensor, " copies"]:
        return self.normalize(self.raw(resid))

    def calibrate(self, clean_resid: Tensor, corrupted_resid: Tensor) -> "ProbeMetric":
        self.clean_value = float(self.raw(clean_resid).item())
        self.corrupted_value = float(self.raw(corrupted_resid).item())
        return self
