"""Patching: probe-derived metrics, position-preserving corruptions, activation / path / attribution
patching, head ablation and head roles.

>>> from wordpos.patching import make_pairs, prepare, patch_heads
>>> pairs = make_pairs(model.tokenizer, n_pairs=64, vocab=data.vocab)
>>> ctx = prepare(model, pairs, probe)            # caches + calibrated metric (1 = clean, 0 = corrupted)
>>> patch_heads(model, ctx).top_heads(5)            # by |signed change| from the unpatched run
"""

from wordpos.patching.ablation import AblationResult, ablate_heads, ablation_sweep, parse_heads, random_head_sets
from wordpos.patching.activation import PatchContext, patch_heads, patch_layer_outputs, patch_resid, prepare
from wordpos.patching.attribution import attribute_heads, attribute_resid, correlation
from wordpos.patching.batched import Patch, run_patches
from wordpos.patching.eap import score_edges
from wordpos.patching.edge_graph import EdgeGraph, EdgeScores
from wordpos.patching.edge_runner import EdgeEval, EdgeRunner, evaluate_masks, exact_edge_scores
from wordpos.patching.corruptions import PatchingPairs, derangement, make_pairs, mean_reference, resample_reference
from wordpos.patching.metrics import ProbeMetric
from wordpos.patching.path import path_patch_direct, path_patch_edges
from wordpos.patching.results import EffectResult
from wordpos.patching.roles import HeadRoles, head_roles
from wordpos.patching.runner import Edit, Intervention, Request, run_interventions
from wordpos.patching.sizing import Sizing

__all__ = [
    "AblationResult", "EdgeEval", "EdgeGraph", "EdgeRunner", "EdgeScores", "Edit", "EffectResult", "HeadRoles",
    "Intervention", "Patch", "PatchContext", "PatchingPairs", "ProbeMetric", "Request", "Sizing",
    "evaluate_masks", "exact_edge_scores", "score_edges",
    "ablate_heads", "ablation_sweep", "attribute_heads", "attribute_resid", "correlation", "derangement", "head_roles",
    "make_pairs", "mean_reference", "parse_heads", "patch_heads", "patch_layer_outputs", "patch_resid",
    "path_patch_direct", "path_patch_edges", "prepare", "random_head_sets", "resample_reference", "run_interventions", "run_patches",
]
