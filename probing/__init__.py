"""Probing: models, word-index datasets, residual activations and the word-index probe.

>>> from wordpos.probing import load_model, WordIndexDataset, collect_residuals, WordIndexProbe
>>> model = load_model("organism")
>>> data = WordIndexDataset.default(model.tokenizer, n_prompts=4096, seed=0)
>>> acts = collect_residuals(model, data, layers="all", positions="word_final")
>>> probe = WordIndexProbe(layer=3, model=acts.model_name).fit(acts.train(layer=3), data.train.labels)
>>> probe.score(acts.test(layer=3), data.test.labels)
"""

from wordpos.probing.lazy import lazy_exports

# public names, imported from their submodules on first use (see probing.lazy)
__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "activations": ["Residuals", "collect_residuals"],
    "baselines": ["PositionBaseline", "analytic_position_baseline", "position_baseline_accuracy"],
    "datasets": ["REFERENCE_PREFIX", "DatasetConfig", "PromptSet", "WordIndexDataset"],
    "engines": ["Engine", "ModelDims", "TLEngine", "as_engine"],
    "errors": ["ConfigError", "CorruptFileError", "DiskFullError", "ModelNotAvailableError", "RunDirError",
               "TokenizationError", "WordposError"],
    "evaluation": ["LayerResult", "ProbeSweep", "evaluate_layer", "sweep_layers"],
    "experiment": ["ProbeConfig", "run_probe"],
    "models": ["KNOWN_MODELS", "load_model"],
    "probe": ["WordIndexProbe"],
    "models.tokenizers": ["gpt2_tokenizer"],
    "vocab": ["WordVocab"],
})
