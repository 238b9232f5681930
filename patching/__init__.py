"""Patching: probe-derived metrics, position-preserving corruptions, activation / path / attribution
patching, head ablation and head roles.

>>> from wordpos.patching import make_pairs, prepare, patch_heads
>>> pairs = make_pairs(model.tokenizer, n_pairs=64, vocab=data.vocab)
>>> ctx = prepare(model, pairs, probe)            # caches + calibrated metric (1 = clean, 0 = corrupted)
>>> patch_heads(model, ctx).top_heads(5)            # by |signed change| from the unpatched run
"""

from wordpos.probing.lazy import lazy_exports

# public names, imported from their submodules on first use (see probing.lazy)
__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "ablation": ["AblationResult", "ablate_heads", "ablation_sweep", "random_head_sets"],
    "heads": ["parse_heads"],
    "activation": ["PatchContext", "patch_heads", "patch_layer_outputs", "patch_resid", "prepare"],
    "attribution": ["attribute_heads", "attribute_resid", "correlation"],
    "batched": ["Patch", "run_patches"],
    "config": ["PatchConfig"],
    "eap": ["score_edges"],
    "experiment": ["PatchRun", "load_probe", "run_patching"],
    "edge_graph": ["EdgeGraph", "EdgeScores"],
    "edge_runner": ["EdgeEval", "EdgeRunner", "evaluate_masks", "exact_edge_scores"],
    "corruptions": ["PatchingPairs", "derangement", "make_pairs", "mean_reference", "resample_reference"],
    "metrics": ["ProbeMetric"],
    "path": ["path_patch_direct", "path_patch_edges"],
    "results": ["EffectResult"],
    "roles": ["HeadRoles", "anchor_evidence", "head_roles"],
    "runner": ["Edit", "Intervention", "Request", "run_interventions"],
    "sizing": ["Sizing"],
})
