"""Activation patching as data: a frozen :class:`Patch` per patch (site, layer, head, pos), turned into an
:class:`~wordpos.patching.runner.Intervention` and run by the one runner (:mod:`wordpos.patching.runner`).

Each patch starts at its layer from the base run's cached ``resid_pre`` (``start_at_layer``) and stops at the
probe's layer (``stop_at_layer``); patches are folded into the batch axis and written by one vectorised index
assignment per hook.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from torch import Tensor

from wordpos.patching.metrics import ProbeMetric
from wordpos.patching.runner import Edit, Intervention, Request, SweepCheckpoint, run_interventions
from wordpos.patching.sizing import Sizing
from wordpos.probing import hooks as H
from wordpos.probing.engines import Engine
from wordpos.probing.errors import ConfigError

Site = Literal["z", "resid_pre", "attn_out", "mlp_out"]
SITES: tuple[str, ...] = ("z", "resid_pre", "attn_out", "mlp_out")

__all__ = ["Patch", "SITES", "SweepCheckpoint", "base_resid_names", "default_max_tokens", "patch_config",
           "run_patches", "source_names"]


@dataclass(frozen=True)
class Patch:
    """Replace the activation at ``site`` of ``layer`` (one ``head`` for ``z``; one ``pos`` or all
    positions when ``pos`` is None) with the source run's activation."""

    site: Site
    layer: int
    head: int | None = None
    pos: int | None = None

    def hook_name(self) -> str:
        if self.site not in SITES:
            raise ConfigError(f"unknown patch site {self.site!r}; use one of {SITES}.")
        return {"z": H.attn_z, "resid_pre": lambda L: H.resid(L, "resid_pre"), "attn_out": H.attn_out,
                "mlp_out": H.mlp_out}[self.site](self.layer)

    def intervention(self) -> Intervention:
        """The runner's form: one ``source`` edit, starting at the patched layer."""
        return Intervention((Edit(self.hook_name(), "source", self.head, self.pos),), start_layer=self.layer,
                            label=str(self))

    def __str__(self) -> str:
        head = f".{self.head}" if self.head is not None else ""
        pos = f"@{self.pos}" if self.pos is not None else ""
        return f"{self.site}:{self.layer}{head}{pos}"


def source_names(patches: Sequence[Patch]) -> list[str]:
    return sorted({p.hook_name() for p in patches})


def base_resid_names(layers: Sequence[int]) -> list[str]:
    return [H.resid(L, "resid_pre") for L in sorted(set(layers))]


def run_patches(engine: Engine, base: Tensor, source_cache: dict[str, Tensor], base_resid: dict[str, Tensor],
                patches: Sequence[Patch], metric: ProbeMetric, *, stop_at_layer: int, max_tokens: int | None = None,
                sizing: Sizing | None = None, checkpoint: SweepCheckpoint | None = None, progress: bool = True,
                desc: str = "patching", skip: dict[str, Any] | None = None) -> Tensor:
    """Normalised metric level for each patch, in the order given. ``base`` are the token ids of the run being
    patched; ``source_cache`` holds the activations patched in; ``base_resid`` the base run's ``resid_pre`` at
    every patched layer (where each patch's forward starts). ``skip``: the base run's keys/values, output and
    first differing position (``PatchContext.skip_fields``), so positions before each patch are not recomputed."""
    if not patches:
        raise ConfigError("no patches to run: the head/layer/position list is empty.")
    ivs = [p.intervention() for p in patches]
    resid = {L: base_resid[H.resid(L, "resid_pre")] for L in {p.layer for p in patches}
             if H.resid(L, "resid_pre") in base_resid}
    req = Request(tokens=base, read=lambda out, cache, P, sl: metric(out).detach().double(),
                  stop_at_layer=stop_at_layer, resid=resid, source=source_cache, **(skip or {}))
    return run_interventions(engine, req, ivs, sizing=sizing, max_tokens=max_tokens, checkpoint=checkpoint,
                             progress=progress, desc=desc, unit="patch").cpu()  # (one copy, after every forward)


def default_max_tokens(engine: Engine, sizing: Sizing | None = None) -> int:
    """Tokens per patched forward on ``engine``'s device (``Sizing.tokens_per_forward``)."""
    return (sizing or Sizing()).tokens_per_forward(engine.device)


def patch_config(**kw: Any) -> dict[str, Any]:
    """A JSON-able record of a sweep's settings (dataclasses expanded)."""
    return {k: asdict(v) if hasattr(v, "__dataclass_fields__") else v for k, v in kw.items()}
