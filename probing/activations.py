"""Residual-stream collection: one batched forward per batch for all requested layers, stopping at the
deepest layer needed, gathering only the requested token class, with memory bounded by the batch.

Results past ``max_memory_mb`` spill to a memory-mapped file on disk, so a 4096-prompt sweep of every
layer of a large model never needs the whole tensor in RAM.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from probing import hooks as H
from probing.datasets import SPLITS, Positions, WordIndexDataset
from probing.engine import Engine, as_engine
from probing.errors import ConfigError, CorruptFileError


def parse_layers(layers: int | str | Sequence[int], n_layers: int) -> list[int]:
    """``"all"``, an int, ``"3"``, ``"0,3,5"`` or a list → sorted, validated layer indices."""
    if isinstance(layers, str):
        if layers == "all":
            return list(range(n_layers))
        try:
            layers = [int(x) for x in layers.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"layers {layers!r} is not 'all' or a comma-separated list of integers.") from None
    if isinstance(layers, int):
        layers = [layers]
    layers = sorted(set(int(x) for x in layers))
    if not layers:
        raise ConfigError("no layers requested: pass 'all' or at least one layer index.")
    bad = [x for x in layers if not 0 <= x < n_layers]
    if bad:
        raise ConfigError(f"layer(s) {bad} out of range: this model has {n_layers} layers, so use 0..{n_layers - 1} "
                          "or 'all'.")
    return layers


@dataclass
class Residuals:
    """Residual vectors ``[sample, layer, d_model]`` per split, with each sample's label, prompt index
    and absolute position. ``train(layer)`` / ``val(layer)`` / ``test(layer)`` give ``[sample, d_model]``."""

    layers: list[int]
    kind: str
    positions: str
    data: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    abs_pos: dict[str, np.ndarray]
    prompt_idx: dict[str, np.ndarray]
    model_name: str = "unknown"
    meta: dict[str, Any] = field(default_factory=dict)

    def get(self, split: str, layer: int) -> Float[Tensor, "sample d_model"]:
        if split not in self.data:
            raise ConfigError(f"split {split!r} was not collected; available: {list(self.data)}.")
        if layer not in self.layers:
            raise ConfigError(f"layer {layer} was not collected; available layers: {self.layers}.")
        return torch.from_numpy(np.ascontiguousarray(self.data[split][:, self.layers.index(layer)]))

    def train(self, layer: int) -> Float[Tensor, "sample d_model"]:
        return self.get("train", layer)

    def val(self, layer: int) -> Float[Tensor, "sample d_model"]:
        return self.get("val", layer)

    def test(self, layer: int) -> Float[Tensor, "sample d_model"]:
        return self.get("test", layer)

    @property
    def d_model(self) -> int:
        return int(next(iter(self.data.values())).shape[-1])

    def save(self, directory: str | Path) -> Path:
        """Write one ``.npy`` per split plus ``residuals.json`` (atomic per file)."""
        from probing.io import atomic_path, write_json

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for split in self.data:
            for what, arr in (("resid", self.data[split]), ("labels", self.labels[split]),
                              ("abs_pos", self.abs_pos[split]), ("prompt_idx", self.prompt_idx[split])):
                with atomic_path(directory / f"{what}_{split}.npy") as tmp:
                    with open(tmp, "wb") as f:
                        np.save(f, np.asarray(arr))
        write_json(directory / "residuals.json", {"layers": self.layers, "kind": self.kind,
                                                  "positions": self.positions, "model": self.model_name,
                                                  "splits": list(self.data), "meta": self.meta})
        return directory

    @classmethod
    def load(cls, directory: str | Path, mmap: bool = True) -> "Residuals":
        from probing.io import read_json

        directory = Path(directory)
        meta = read_json(directory / "residuals.json", "residual index")
        arrays: dict[str, dict[str, np.ndarray]] = {"resid": {}, "labels": {}, "abs_pos": {}, "prompt_idx": {}}
        try:
            for split in meta["splits"]:
                for what in arrays:
                    arrays[what][split] = np.load(directory / f"{what}_{split}.npy",
                                                  mmap_mode="r" if (mmap and what == "resid") else None)
        except (OSError, ValueError, KeyError) as e:
            raise CorruptFileError(f"residual cache {directory} is incomplete or corrupt ({e}); delete it and "
                                   "re-run collection.") from e
        return cls(layers=list(meta["layers"]), kind=meta["kind"], positions=meta["positions"],
                   data=arrays["resid"], labels=arrays["labels"], abs_pos=arrays["abs_pos"],
                   prompt_idx=arrays["prompt_idx"], model_name=meta.get("model", "unknown"),
                   meta=meta.get("meta", {}))


def check_fits_context(engine: Engine, data: WordIndexDataset) -> None:
    n_ctx = engine.dims.n_ctx
    if data.max_len() > n_ctx:
        raise ConfigError(
            f"the longest prompt has {data.max_len()} tokens but {engine.name} has a context of {n_ctx} tokens; "
            "use fewer words (n_words) or a shorter prefix."
        )


@torch.inference_mode()
def collect_residuals(
    model: Any,
    data: WordIndexDataset,
    layers: int | str | Sequence[int] = "all",
    positions: Positions = "word_final",
    kind: Literal["resid_pre", "resid_mid", "resid_post"] = "resid_post",
    *,
    splits: Sequence[str] = SPLITS,
    batch_size: int = 64,
    max_memory_mb: float = 2048,
    spill_dir: str | Path | None = None,
    progress: bool = True,
    dtype: np.dtype = np.float32,
) -> Residuals:
    """Residual stream ``blocks.{L}.hook_{kind}`` at each requested layer and token class.

    One forward per batch caches every requested layer and stops at the deepest one. Memory is
    bounded by one batch; results above ``max_memory_mb`` go to a memory-mapped file in
    ``spill_dir`` (a temporary directory by default).
    """
    engine = as_engine(model)
    layers = parse_layers(layers, engine.dims.n_layers)
    check_fits_context(engine, data)
    names = [H.resid(L, kind) for L in layers]
    stop = max(H.stop_layer_for(L, kind) for L in layers)
    d_model = engine.dims.d_model
    out: dict[str, np.ndarray] = {}
    labels, abs_pos, prompt_idx = {}, {}, {}
    total = sum(len(data.split(s).positions(positions)[0]) for s in splits)
    spill = total * len(layers) * d_model * np.dtype(dtype).itemsize > max_memory_mb * 2**20
    spill_root = Path(spill_dir or tempfile.mkdtemp(prefix="wordpos-resid-")) if spill else None
    bar = tqdm(total=sum(len(data.split(s)) for s in splits), desc=f"residuals ({len(layers)} layers)",
               unit="prompt", disable=not progress)
    for split in splits:
        ps = data.split(split)
        prompt, pos = ps.positions(positions)
        n = len(prompt)
        shape = (n, len(layers), d_model)
        if spill_root is not None:
            spill_root.mkdir(parents=True, exist_ok=True)
            buf = np.lib.format.open_memmap(spill_root / f"resid_{split}.npy", mode="w+", dtype=dtype, shape=shape)
        else:
            buf = np.empty(shape, dtype=dtype)
        labels[split] = ps.word_index[prompt, pos].numpy()
        abs_pos[split] = pos.numpy()
        prompt_idx[split] = prompt.numpy()
        # samples are in prompt order, so each batch of prompts fills one contiguous slice
        starts = np.searchsorted(prompt.numpy(), np.arange(0, len(ps) + 1))
        for b0 in range(0, len(ps), batch_size):
            b1 = min(b0 + batch_size, len(ps))
            width = int(ps.lengths[b0:b1].max())
            toks = ps.tokens[b0:b1, :width].to(engine.device)
            _, cache = engine.run(toks, cache=names, stop_at_layer=stop)
            s0, s1 = starts[b0], starts[b1]
            rows = (prompt[s0:s1] - b0).to(engine.device)
            cols = pos[s0:s1].to(engine.device)
            stacked = torch.stack([cache[nm][rows, cols] for nm in names], dim=1)  # [sample, layer, d_model]
            buf[s0:s1] = stacked.float().cpu().numpy()
            bar.update(b1 - b0)
        if isinstance(buf, np.memmap):
            buf.flush()
        out[split] = buf
    bar.close()
    meta = {"stop_at_layer": stop, "batch_size": batch_size, "spilled_to": str(spill_root) if spill_root else None}
    return Residuals(layers=layers, kind=kind, positions=positions, data=out, labels=labels, abs_pos=abs_pos,
                     prompt_idx=prompt_idx, model_name=engine.name, meta=meta)

