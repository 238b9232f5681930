"""The method registry: one entry per patching method (name → stage function, the axes of its main result, the
options it reads), driving ``wordpos patch`` (argparse choices and options), :func:`run_patching` and the tests.

A stage function takes :class:`StageInputs` (engine, probe, config, word split) and returns a
:class:`StageOutput` (named :class:`~wordpos.patching.results.EffectResult` s, figures, summary entries and how its
main result ranks heads). The built-in methods are listed at the end of this module with their stage functions
named as ``"module:function"`` (in :mod:`wordpos.patching.methods`), imported on first call: the command line reads
the names, options and help without importing torch. Other code registers its own with :func:`register`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wordpos.probing.errors import ConfigError


@dataclass(frozen=True)
class Option:
    """A command-line option of ``wordpos patch``: ``dest`` is the ``PatchConfig`` field it sets."""

    flag: str
    dest: str
    help: str
    type: Callable[[str], Any] | None = None
    choices: tuple[str, ...] | None = None
    action: str | None = None


@dataclass
class StageInputs:
    """What every method starts from; pairs, the patching context and datasets are built on first use."""

    engine: Any
    probe: Any
    config: Any  # PatchConfig
    vocab: Any
    progress: bool = True
    out: Path | None = None
    cache: dict[str, Any] = field(default_factory=dict)

    @property
    def n_words(self) -> int:
        return len(self.probe.classes_)

    def pairs(self) -> Any:
        from wordpos.patching.corruptions import make_pairs

        if "pairs" not in self.cache:
            c = self.config
            self.cache["pairs"] = make_pairs(self.engine.tokenizer, c.n_pairs, vocab=self.vocab, words="test",
                                             kind=c.corruption, n_words=self.n_words, seed=c.seed)
        return self.cache["pairs"]

    def ctx(self, metric: str | None = None, direction: str | None = None) -> Any:
        """The :class:`~wordpos.patching.activation.PatchContext` for the config's (or the given) metric and
        direction, computed once per combination."""
        from wordpos.patching.activation import prepare

        metric, direction = metric or self.config.metric, direction or self.config.direction
        key = f"ctx:{metric}:{direction}"
        if key not in self.cache:
            self.cache[key] = prepare(self.engine, self.pairs(), self.probe, metric=metric, direction=direction,
                                      sizing=self.config.run_sizing())
        return self.cache[key]

    def attribution(self, metric: str | None = None, direction: str | None = None) -> Any:
        """Attribution patching of every head on :meth:`ctx` (one forward and one backward), computed once per
        context: the screen, the attribution stage and the ablation candidates all rank heads by it. A copy."""
        import copy

        from wordpos.patching.attribution import attribute_heads

        metric, direction = metric or self.config.metric, direction or self.config.direction
        key = f"attribution:{metric}:{direction}"
        if key not in self.cache:
            self.cache[key] = attribute_heads(self.engine, self.ctx(metric, direction))
        return copy.deepcopy(self.cache[key])

    def data(self, n_prompts: int) -> Any:
        from wordpos.probing.datasets import DatasetConfig, WordIndexDataset

        key = f"data:{n_prompts}"
        if key not in self.cache:
            self.cache[key] = WordIndexDataset.generate(
                self.engine.tokenizer, DatasetConfig(n_prompts=n_prompts, n_words=self.n_words, seed=self.config.seed),
                vocab=self.vocab)
        return self.cache[key]

    def checkpoint_dir(self) -> Path | None:
        if self.config.checkpoint_dir:
            return Path(self.config.checkpoint_dir)
        return self.out / "checkpoints" if self.out is not None else None


@dataclass
class StageOutput:
    """A method's results: ``results["heads"]`` is the main ``[layer, head]`` result (others are saved in
    sub-directories), ``rank`` how its heads are ranked (``abs``: by |change|; ``decrease``: most negative first).
    ``figs`` holds figures or functions that draw them (drawn when saved, so their time is counted apart)."""

    results: dict[str, Any]
    figs: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    rank: str = "abs"


class LazyStage:
    """A stage function named ``"module:function"``, imported on its first call, so that reading the registry
    (``wordpos --help``) imports no method's dependencies."""

    def __init__(self, target: str):
        if not isinstance(target, str) or ":" not in target:
            raise ConfigError(f"a stage must be a function or a 'module:function' name, got {target!r}.")
        self.target = target
        self._fn: Callable[[StageInputs], Any] | None = None

    def resolve(self) -> Callable[[StageInputs], Any]:
        """The function; a missing module or name is one ConfigError, while an import that fails inside the module
        (e.g. a missing dependency) raises its own error, which names what to install."""
        if self._fn is None:
            module, _, attr = self.target.partition(":")
            try:
                mod = importlib.import_module(module)
            except ModuleNotFoundError as e:
                if e.name and (module == e.name or module.startswith(e.name + ".")):
                    raise ConfigError(f"stage {self.target!r}: there is no module {module!r}; register the method "
                                      "with a function or an importable 'module:function'.") from e
                raise
            if not callable(getattr(mod, attr, None)):
                raise ConfigError(f"stage {self.target!r}: module {module!r} has no function {attr!r}; register the "
                                  "method with a function or an importable 'module:function'.")
            self._fn = getattr(mod, attr)
        return self._fn

    def __call__(self, inputs: StageInputs) -> Any:
        return self.resolve()(inputs)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LazyStage) and other.target == self.target

    def __hash__(self) -> int:
        return hash(self.target)

    def __repr__(self) -> str:
        return f"LazyStage({self.target!r})"


@dataclass(frozen=True)
class MethodSpec:
    """One registered method. ``run``: the stage function, or its ``"module:function"`` name (kept as a
    :class:`LazyStage`, imported on the first call); ``axes``: the axes of its main result; ``options``: the
    ``PatchConfig`` fields it reads (its CLI options); ``cli``: offered by ``wordpos patch --method``;
    ``uses_pairs``: built on clean/corrupted pairs (else on prompts)."""

    name: str
    run: Callable[[StageInputs], Any]
    axes: tuple[str, ...]
    options: tuple[str, ...]
    help: str
    cli: bool = True
    uses_pairs: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.run, str):
            object.__setattr__(self, "run", LazyStage(self.run))
        elif not callable(self.run):
            raise ConfigError(f"method {self.name!r}: run must be a function or a 'module:function' name, got "
                              f"{self.run!r}.")

    def function(self) -> Callable[[StageInputs], Any]:
        """The stage function (imported here when the spec names it)."""
        return self.run.resolve() if isinstance(self.run, LazyStage) else self.run


METHODS: dict[str, MethodSpec] = {}
METRICS = ("logit_diff", "projection", "accuracy")
DIRECTIONS = ("denoising", "noising")
ABLATIONS = ("zero", "mean", "resample")
CORRUPTIONS = ("split", "merge")

OPTIONS: dict[str, Option] = {
    "metric": Option("--metric", "metric", "probe metric (normalised: 1 = clean, 0 = corrupted)",
                     choices=METRICS),
    "direction": Option("--direction", "direction", "denoising: corrupted run, clean activations patched in; "
                        "noising: the reverse", choices=DIRECTIONS),
    "n_pairs": Option("--n-pairs", "n_pairs", "clean/corrupted pairs", type=int),
    "corruption": Option("--corruption", "corruption", "split: one 3-token word -> three 1-token words (indices "
                         "+2); merge: the reverse", choices=CORRUPTIONS),
    "by_pos": Option("--no-by-pos", "by_pos", "skip the head x position sweep", action="store_false"),
    "ablation": Option("--ablation", "ablation", "how heads are ablated", choices=ABLATIONS),
    "top_k": Option("--top-k", "top_k", "heads ablated together", type=int),
    "n_random": Option("--n-random", "n_random", "random-head control draws", type=int),
    "n_prompts": Option("--n-prompts", "n_prompts", "prompts generated for ablation", type=int),
    "receivers": Option("--receivers", "receivers", "top heads used as path-patching receivers", type=int),
    "senders": Option("--senders", "senders", "top heads used as path-patching senders", type=int),
    "max_tokens": Option("--max-tokens", "max_tokens", "tokens per batched forward (default: the sizing policy by "
                         "device)", type=int),
}


def register(spec: MethodSpec) -> MethodSpec:
    unknown = [o for o in spec.options if o not in OPTIONS]
    if unknown:
        raise ConfigError(f"method {spec.name!r} names unknown options {unknown}; known: {sorted(OPTIONS)}.")
    METHODS[spec.name] = spec
    return spec


def methods(cli_only: bool = False) -> dict[str, MethodSpec]:
    """Every registered method: the built-in ones (below) and any registered since."""
    return {k: v for k, v in METHODS.items() if v.cli or not cli_only}


def get(name: str) -> MethodSpec:
    found = methods()
    if name not in found:
        raise ConfigError(f"unknown patching method {name!r}; registered methods are {sorted(found)}.")
    return found[name]


def cli_options() -> list[Option]:
    """The options of every CLI method, once each, in registry order."""
    seen: dict[str, Option] = {}
    for spec in methods(cli_only=True).values():
        for o in spec.options:
            seen.setdefault(o, OPTIONS[o])
    return list(seen.values())


PAIR_OPTIONS = ("metric", "direction", "n_pairs", "corruption", "max_tokens")
_M = "wordpos.patching.methods:"

register(MethodSpec("activation", _M + "activation_stage", ("layer", "head"), PAIR_OPTIONS + ("by_pos",),
                    "activation patching of heads, residual stream, MLPs (and heads x positions)"))
register(MethodSpec("attribution", _M + "attribution_stage", ("layer", "head"), PAIR_OPTIONS,
                    "attribution patching (gradient estimate), compared with activation patching"))
register(MethodSpec("path", _M + "path_stage", ("layer", "head"), PAIR_OPTIONS + ("receivers", "senders"),
                    "path patching: direct paths and sender -> receiver edges"))
register(MethodSpec("ablation", _M + "ablation_stage", ("layer", "head"),
                    ("ablation", "top_k", "n_random", "n_prompts", "max_tokens"),
                    "ablate each head, then the top-k together against random k-sets", uses_pairs=False))
register(MethodSpec("head_means", _M + "head_means_stage", ("pos", "head", "d_head"), ("n_prompts",),
                    "position-wise mean head outputs (mean-ablation reference)", cli=False, uses_pairs=False))
register(MethodSpec("roles", _M + "roles_stage", ("layer", "head"), (), "attention roles of every head", cli=False,
                    uses_pairs=False))
