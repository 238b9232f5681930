"""Probing: models, word-index datasets, residual activations and the word-index probe.

>>> from wordpos.probing import load_model, WordIndexDataset, collect_residuals, WordIndexProbe
>>> model = load_model("organism")
>>> data = WordIndexDataset.default(model.tokenizer, n_prompts=4096, seed=0)
>>> acts = collect_residuals(model, data, layers="all", positions="word_final")
>>> probe = WordIndexProbe().fit(acts.train(layer=3), data.train.labels)
>>> probe.score(acts.test(layer=3), data.test.labels)
"""

from wordpos.probing.activations import Residuals, collect_residuals
from wordpos.probing.baselines import PositionBaseline, analytic_position_baseline, position_baseline_accuracy
from wordpos.probing.datasets import REFERENCE_PREFIX, DatasetConfig, PromptSet, WordIndexDataset
from wordpos.probing.engines import Engine, ModelDims, TLEngine, as_engine
from wordpos.probing.errors import (ConfigError, CorruptFileError, ModelNotAvailableError, RunDirError, TokenizationError,
                            WordposError)
from wordpos.probing.evaluation import LayerResult, ProbeSweep, evaluate_layer, sweep_layers
from wordpos.probing.experiment import ProbeConfig, run_probe
from wordpos.probing.models import KNOWN_MODELS, load_model
from wordpos.probing.probe import WordIndexProbe
from wordpos.probing.models.tokenizers import gpt2_tokenizer
from wordpos.probing.vocab import WordVocab

__all__ = [
    "REFERENCE_PREFIX", "KNOWN_MODELS", "ConfigError", "CorruptFileError", "DatasetConfig", "Engine", "LayerResult",
    "ModelDims", "ModelNotAvailableError", "PositionBaseline", "ProbeConfig", "ProbeSweep", "PromptSet", "Residuals",
    "RunDirError", "TLEngine", "TokenizationError", "WordIndexDataset", "WordIndexProbe", "WordVocab", "WordposError",
    "analytic_position_baseline", "as_engine", "collect_residuals", "evaluate_layer", "gpt2_tokenizer", "load_model",
    "position_baseline_accuracy", "run_probe", "sweep_layers",
]
