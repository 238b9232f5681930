"""Patching: probe-derived metrics, position-preserving corruptions, activation / path / attribution
patching, head ablation and head roles.

>>> from patching import make_pairs, prepare, patch_heads
>>> pairs = make_pairs(model.tokenizer, n_pairs=64, vocab=data.vocab)
>>> ctx = prepare(model, pairs, probe)            # caches + calibrated metric (1 = clean, 0 = corrupted)
>>> patch_heads(model, ctx).top_heads(5)
"""

from patching.ablation import AblationResult, ablate_heads, ablation_sweep, parse_heads
from patching.activation import PatchContext, patch_heads, patch_layer_outputs, patch_resid, prepare
from patching.attribution import attribute_heads, attribute_resid, correlation
from patching.batched import Patch, run_patches
from patching.corruptions import PatchingPairs, make_pairs, mean_reference, resample_reference
from patching.metrics import ProbeMetric
from patching.path import path_patch_direct, path_patch_edges
from patching.results import EffectResult
from patching.roles import HeadRoles, head_roles

__all__ = [
    "AblationResult", "EffectResult", "HeadRoles", "Patch", "PatchContext", "PatchingPairs", "ProbeMetric",
    "ablate_heads", "ablation_sweep", "attribute_heads", "attribute_resid", "correlation", "head_roles",
    "make_pairs", "mean_reference", "parse_heads", "patch_heads", "patch_layer_outputs", "patch_resid",
    "path_patch_direct", "path_patch_edges", "prepare", "resample_reference", "run_patches",
]
