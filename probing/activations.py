"""Residual-stream collection: one batched forward per batch for all requested layers, stopping at the
deepest layer needed, gathering only the requested token class, with memory bounded by the batch.

Results past ``max_memory_mb`` spill to a memory-mapped file on disk, so a 4096-prompt sweep of every
layer of a large model never needs the whole tensor in RAM.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from wordpos.probing.progress import progress_bar as tqdm

from wordpos.probing import hooks as H
from wordpos.probing.datasets import SPLITS, Positions, WordIndexDataset
from wordpos.probing.engines import Engine, as_engine
from wordpos.probing.errors import ConfigError, CorruptFileError
from wordpos.probing.io import atomic_path, check_free_space, disk_full_as_error, preallocate, read_json, write_json
from wordpos.probing.reprs import array_summary, clipped, short_repr


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
    data: dict[str, np.ndarray | Tensor]  # Tensors when kept on the device (collect_residuals(keep_on_device=))
    labels: dict[str, np.ndarray]
    abs_pos: dict[str, np.ndarray]
    prompt_idx: dict[str, np.ndarray]
    model_name: str = "unknown"
    meta: dict[str, Any] = field(default_factory=dict)

    def get(self, split: str, layer: int) -> Float[Tensor, "sample d_model"]:
        """``[sample, d_model]`` at ``layer`` (on the device when the residuals were kept there)."""
        if split not in self.data:
            raise ConfigError(f"split {split!r} was not collected; available: {list(self.data)}.")
        if layer not in self.layers:
            raise ConfigError(f"layer {layer} was not collected; available layers: {self.layers}.")
        data = self.data[split]
        if isinstance(data, Tensor):
            return data[:, self.layers.index(layer)].contiguous()
        arr = np.ascontiguousarray(data[:, self.layers.index(layer)])
        return torch.from_numpy(arr if arr.flags.writeable else arr.copy())  # read-only memmaps: a private copy

    def __repr__(self) -> str:
        return short_repr(self, [f"model {self.model_name!r}", f"{self.kind} at {self.positions} tokens",
                                 f"layers {clipped(self.layers, 8)}",
                                 ", ".join(f"{k} {array_summary(v)}" for k, v in self.data.items())
                                 + " [sample×layer×d_model]"])

    def train(self, layer: int) -> Float[Tensor, "sample d_model"]:
        """The training split's residuals at ``layer``, ``[sample, d_model]`` (labels: ``labels['train']``)."""
        return self.get("train", layer)

    def val(self, layer: int) -> Float[Tensor, "sample d_model"]:
        """The validation split's residuals at ``layer`` (training words, new prompts)."""
        return self.get("val", layer)

    def test(self, layer: int) -> Float[Tensor, "sample d_model"]:
        """The held-out split's residuals at ``layer`` (words never seen in training)."""
        return self.get("test", layer)

    @property
    def d_model(self) -> int:
        return int(next(iter(self.data.values())).shape[-1])

    @property
    def nbytes(self) -> int:
        return sum(int(v.numel() * v.element_size()) if isinstance(v, Tensor) else int(np.asarray(v).nbytes)
                   for v in self.data.values())

    def to_host(self) -> "Residuals":
        """The same residuals with every split as a host numpy array (a copy only where they are on a device)."""
        data = {k: v.cpu().numpy() if isinstance(v, Tensor) else v for k, v in self.data.items()}
        return Residuals(self.layers, self.kind, self.positions, data, self.labels, self.abs_pos, self.prompt_idx,
                         self.model_name, dict(self.meta))

    def save(self, directory: str | Path) -> Path:
        """Write one ``.npy`` per split plus ``residuals.json`` (atomic per file)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        host = self.to_host()
        for split in host.data:
            for what, arr in (("resid", host.data[split]), ("labels", self.labels[split]),
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
        """Read residuals written by :meth:`save`; ``mmap`` maps the arrays instead of reading them."""
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


CPU_BATCH = 64
"""Prompts per forward on the CPU: the measured cache-friendly size (larger batches gain nothing there)."""
MAX_DEVICE_BATCH = 1024
"""Cap on a memory-derived accelerator batch: beyond it the device is already full of work."""


def _bytes_per_token(engine: Engine, n_cached: int) -> float:
    """Peak bytes one token costs in a caching forward: the cached residuals, the layer's transient
    activations (residual copies, 4·d_model MLP, attention scores over the context) in the model's dtype."""
    from wordpos.probing.engines.base import engine_dtype

    dims = engine.dims
    itemsize = torch.empty(0, dtype=engine_dtype(engine) or torch.float32).element_size()
    transient = 8 * dims.d_model + 2 * 4 * dims.d_model + 3 * dims.n_heads * min(dims.n_ctx, 2048)
    return itemsize * (n_cached * dims.d_model + transient)


def residual_batch_size(engine: Engine, data: WordIndexDataset, n_layers_cached: int) -> int:
    """Prompts per forward: on an accelerator as many as fit in its free memory (capped at
    ``MAX_DEVICE_BATCH``), on the CPU the measured ``CPU_BATCH``."""
    try:
        from wordpos.probing.engines.memory import suggest_batch
    except ImportError:  # pragma: no cover - the memory helper ships with the engines
        return CPU_BATCH
    rows = suggest_batch(engine, int(data.max_len()), _bytes_per_token(engine, n_layers_cached),
                         max_batch=MAX_DEVICE_BATCH, setting="--batch-size (or the prompt length, --n-words)")
    return CPU_BATCH if rows is None else max(int(rows), 1)


def _device_chunk_rows(device: torch.device, row_bytes: int) -> int | None:
    """Gathered samples kept on an accelerator before one copy to the host (a quarter of its free memory);
    ``None`` on the CPU, where every batch is written in place."""
    try:
        from wordpos.probing.engines.memory import free_memory_bytes
    except ImportError:  # pragma: no cover
        return None
    free = free_memory_bytes(device)
    return None if free is None else max(int(free * 0.25 // max(row_bytes, 1)), 1)


def _open_spill(path: Path, shape: tuple[int, ...], dtype: Any, temporary: bool) -> np.memmap:
    """A ``.npy`` memory map at ``path`` with its disk space reserved (a full disk is a ``DiskFullError`` here, not a
    SIGBUS at a later write into the map). A file this call created is removed again if making it fails; with
    ``temporary``, the file (and its folder, once empty) goes when the last array using the map does."""
    existed = path.exists()
    try:
        with disk_full_as_error(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            buf = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
            preallocate(path, buf.offset + buf.nbytes)
    except BaseException:
        if not existed:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
        raise
    if temporary:  # views and copies of the Residuals share ``buf``; on POSIX a mapped file outlives its name
        weakref.finalize(buf, _remove_spill_file, str(path))
    return buf


def _remove_spill_file(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
    with contextlib.suppress(OSError):
        os.rmdir(os.path.dirname(path))  # the temporary folder, once its last file is gone


@torch.inference_mode()
def collect_residuals(
    model: Any,
    data: WordIndexDataset,
    layers: int | str | Sequence[int] = "all",
    positions: Positions = "word_final",
    kind: Literal["resid_pre", "resid_mid", "resid_post"] = "resid_post",
    *,
    splits: Sequence[str] = SPLITS,
    batch_size: int | None = None,
    max_memory_mb: float = 2048,
    spill_dir: str | Path | None = None,
    progress: bool = True,
    dtype: np.dtype = np.float32,
    keep_on_device: bool | None = None,
) -> Residuals:
    """Residual stream ``blocks.{L}.hook_{kind}`` at each requested layer and token class.

    One forward per batch caches every requested layer and stops at the deepest one. ``batch_size``
    ``None`` picks it: on an accelerator from its free memory, on the CPU the measured ``CPU_BATCH``.
    On an accelerator the gathered vectors stay on the device (no per-batch sync); with ``keep_on_device``
    (default: on an accelerator when they take at most a quarter of its free memory) they stay there, since the
    probe fits run there too, and :meth:`Residuals.to_host` or ``save`` copy them when needed; otherwise they go to
    the host in few large copies. Host memory is bounded by ``max_memory_mb``: beyond it results go to a
    memory-mapped file in ``spill_dir`` (by default a temporary folder, removed when the result is).
    """
    engine = as_engine(model)
    if kind not in ("resid_pre", "resid_mid", "resid_post"):
        raise ConfigError(f"kind must be 'resid_pre', 'resid_mid' or 'resid_post' (where in each block the residual "
                          f"stream is read), got {kind!r}.")
    layers = parse_layers(layers, engine.dims.n_layers)
    check_fits_context(engine, data)
    names = [H.resid(L, kind) for L in layers]
    stop = max(H.stop_layer_for(L, kind) for L in layers)
    d_model = engine.dims.d_model
    if batch_size is None:
        batch_size = residual_batch_size(engine, data, len(layers))
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}.")
    out: dict[str, np.ndarray] = {}
    labels, abs_pos, prompt_idx = {}, {}, {}
    total = sum(len(data.split(s).positions(positions)[0]) for s in splits)
    total_bytes = total * len(layers) * d_model * np.dtype(dtype).itemsize
    out_dtype = torch.from_numpy(np.empty(0, dtype=dtype)).dtype
    chunk = _device_chunk_rows(engine.device, len(layers) * d_model * np.dtype(dtype).itemsize)
    if keep_on_device is None:  # chunk: the rows a quarter of the device's free memory holds (None on the CPU)
        keep_on_device = chunk is not None and total <= chunk
    keep_on_device = bool(keep_on_device) and engine.device.type != "meta"  # (on the CPU: torch tensors)
    spill = not keep_on_device and total_bytes > max_memory_mb * 2**20
    if spill:  # a memory map on a full disk kills the process (SIGBUS): refuse before any forward
        named = Path(spill_dir) if spill_dir is not None else None
        old_files = [named / f"resid_{s}.npy" for s in splits] if named is not None else []
        reused = sum(f.stat().st_size for f in old_files if f.is_file())  # a re-run overwrites its own files
        check_free_space(named or tempfile.gettempdir(), total_bytes - reused,
                         f"spilling {total:,} residual vectors ({len(layers)} layer{'s' * (len(layers) != 1)}) to disk",
                         "pass spill_dir= a folder on a disk with room, or raise max_memory_mb to keep them in memory")
    spill_root = Path(spill_dir or tempfile.mkdtemp(prefix="wordpos-resid-")) if spill else None
    own_spill = spill_root is not None and spill_dir is None  # our temporary folder: removed with its arrays
    spilled: list[Path] = []  # the spill files this call made: removed if it fails
    bar = tqdm(total=sum(len(data.split(s)) for s in splits), desc=f"residuals ({len(layers)} layers)",
               unit="prompt", disable=not progress)
    try:
        for split in splits:
            ps = data.split(split)
            prompt, pos = ps.positions(positions)
            n = len(prompt)
            shape = (n, len(layers), d_model)
            if keep_on_device:
                buf = None  # the split is the concatenation of its batches, on the device
            elif spill_root is not None:
                path = spill_root / f"resid_{split}.npy"
                buf = _open_spill(path, shape, dtype, own_spill)
                spilled.append(path)  # (after: a file it could not open is not ours)
            else:
                buf = np.empty(shape, dtype=dtype)
            labels[split] = ps.word_index[prompt, pos].numpy()
            abs_pos[split] = pos.numpy()
            prompt_idx[split] = prompt.numpy()
            # samples are in prompt order, so each batch of prompts fills one contiguous slice
            starts = np.searchsorted(prompt.numpy(), np.arange(0, len(ps) + 1))
            rows_all, cols_all = prompt.to(engine.device), pos.to(engine.device)  # one transfer per split
            pending: list[Tensor] = []  # gathered on the device, not yet on the host
            p0 = 0  # first sample of ``pending``

            def flush(upto: int) -> None:
                nonlocal p0
                if pending:
                    buf[p0:upto] = torch.cat(pending).cpu().numpy()  # the one sync per chunk
                    pending.clear()
                p0 = upto

            for b0 in range(0, len(ps), batch_size):
                b1 = min(b0 + batch_size, len(ps))
                width = int(ps.lengths[b0:b1].max())
                toks = ps.tokens[b0:b1, :width].to(engine.device, non_blocking=True)
                _, cache = engine.run(toks, cache=names, stop_at_layer=stop)
                s0, s1 = int(starts[b0]), int(starts[b1])
                rows, cols = rows_all[s0:s1] - b0, cols_all[s0:s1]
                stacked = torch.stack([cache[nm][rows, cols] for nm in names], dim=1)  # [sample, layer, d]
                stacked = stacked.to(out_dtype)
                del cache
                if keep_on_device:
                    pending.append(stacked)
                elif chunk is None:  # host device: write in place
                    buf[s0:s1] = stacked.numpy()
                    p0 = s1
                else:
                    pending.append(stacked)
                    if s1 - p0 >= chunk:
                        flush(s1)
                bar.update(b1 - b0)
            if keep_on_device:
                out[split] = (torch.cat(pending) if pending
                              else torch.empty(shape, dtype=out_dtype, device=engine.device))
                pending.clear()
                continue
            flush(n)
            if isinstance(buf, np.memmap):
                buf.flush()
            out[split] = buf
        bar.close()
    except BaseException:  # a failed or interrupted collection leaves no half-written spill files behind
        if own_spill:
            shutil.rmtree(spill_root, ignore_errors=True)
        for path in spilled:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
        raise
    meta = {"stop_at_layer": stop, "batch_size": batch_size, "spilled_to": str(spill_root) if spill_root else None,
            "on_device": str(engine.device) if keep_on_device else None}
    return Residuals(layers=layers, kind=kind, positions=positions, data=out, labels=labels, abs_pos=abs_pos,
                     prompt_idx=prompt_idx, model_name=engine.name, meta=meta)
