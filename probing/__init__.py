"""Probing: models, word-index datasets, residual activations and the word-index probe.

>>> from probing import load_model, WordIndexDataset, collect_residuals, WordIndexProbe
>>> model = load_model("organism")
>>> data = WordIndexDataset.default(model.tokenizer, n_prompts=4096, seed=0)
>>> acts = collect_residuals(model, data, layers="all", positions="word_final")
>>> probe = WordIndexProbe().fit(acts.train(layer=3), data.train.labels)
>>> probe.score(acts.test(layer=3), data.test.labels)
"""

from probing.activations import Residuals, collect_residuals
from probing.baselines import PositionBaseline, analytic_position_baseline, position_baseline_accuracy
from probing.datasets import REFERENCE_PREFIX, DatasetConfig, PromptSet, WordIndexDataset
from probing.engine import Engine, ModelDims, TLEngine, as_engine
from probing.errors import (ConfigError, CorruptFileError, ModelNotAvailableError, RunDirError, TokenizationError,
                            WordposError)
from probing.evaluation import LayerResult, ProbeSweep, evaluate_layer, sweep_layers
from probing.experiment import ProbeConfig, run_probe
from probing.models import KNOWN_MODELS, load_model
from probing.probe import WordIndexProbe
from probing.tokenizers import gpt2_tokenizer
from probing.vocab import WordVocab

__all__ = [
    "REFERENCE_PREFIX", "KNOWN_MODELS", "ConfigError", "CorruptFileError", "DatasetConfig", "Engine", "LayerResult",
    "ModelDims", "ModelNotAvailableError", "PositionBaseline", "ProbeConfig", "ProbeSweep", "PromptSet", "Residuals",
    "RunDirError", "TLEngine", "TokenizationError", "WordIndexDataset", "WordIndexProbe", "WordVocab", "WordposError",
    "analytic_position_baseline", "as_engine", "collect_residuals", "evaluate_layer", "gpt2_tokenizer", "load_model",
    "position_baseline_accuracy", "run_probe", "sweep_layers",
]
