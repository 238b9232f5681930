"""One manifest format and one damage policy for every model directory wordpos ships, trains, builds or pulls.

**Format** (``wordpos_model.json``, format ``wordpos.model/1``)::

    {"format": "wordpos.model/1", "name": "organism", "source": "...", "config": {...},
     ...model-specific extras (data rule, wheel sha256, ground truth, ...)...,
     "files": {"model.safetensors": {"size": 6846112, "sha256": "a1e4..."}, ...}}

``files`` lists every file of the directory except the manifest itself; the manifest is written last, so a
directory without one is a build that did not finish (or a copy still under way).

**Damage policy.** A directory whose manifest is missing or unreadable, or one of whose files is missing or
differs from its record, is *damaged* and never used: :func:`verify` raises
:class:`~wordpos.probing.errors.CorruptFileError` naming the directory, what is wrong and the command that
rebuilds it. Loading never deletes or silently rebuilds a downloaded or trained model (the directory may be a
copy still being made by hand, and a rebuild may need the network or minutes of training); only the planted
model, built in code in seconds, rebuilds itself. The check on load compares sizes (always) and sha256
(``deep=True``; each model chooses: the 7 MB organism is hashed on every load, the 538 MB SmolLM2 at pull time
and on request).

Older layouts are still read: SmolLM2 manifests without ``format`` (``files`` entries ``{size, sha256}`` or a
bare size) and the organism's ``wordpos.organism/1`` (``{sha256, bytes}``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wordpos.probing.errors import ConfigError, CorruptFileError
from wordpos.probing.io import sha256_file, write_json

MANIFEST = "wordpos_model.json"
FORMAT = "wordpos.model/1"
LEGACY_FORMATS = ("wordpos.organism/1",)
_CORE = ("format", "name", "source", "config", "files")


@dataclass(frozen=True)
class FileRecord:
    """Size in bytes and hex sha256 of one file (``sha256`` is None only in sizes-only legacy manifests)."""

    size: int
    sha256: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 0:
            raise ConfigError(f"file size must be a non-negative int, got {self.size!r}.")
        if self.sha256 is not None and (not isinstance(self.sha256, str) or len(self.sha256) != 64):
            raise ConfigError(f"sha256 must be 64 hex digits or None, got {self.sha256!r}.")

    @classmethod
    def from_dict(cls, rec: Any) -> "FileRecord":
        """``{"size", "sha256"}``; also the organism's old ``{"bytes", "sha256"}`` and a bare int size."""
        if isinstance(rec, int) and not isinstance(rec, bool):
            return cls(size=rec)
        if not isinstance(rec, dict):
            raise ConfigError(f"a file record must be a mapping or an int, got {type(rec).__name__}.")
        size = rec.get("size", rec.get("bytes"))
        if size is None:
            raise ConfigError(f"a file record has no integer size: {rec!r}.")
        return cls(size=size, sha256=rec.get("sha256"))

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "sha256": self.sha256}


@dataclass
class Manifest:
    """What a model directory holds and where it came from (see the module docstring for the JSON layout)."""

    name: str
    source: str
    files: dict[str, FileRecord]
    config: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT

    def __post_init__(self) -> None:
        if not isinstance(self.files, dict) or not all(isinstance(r, FileRecord) for r in self.files.values()):
            raise ConfigError("Manifest.files must map file names to FileRecord.")
        if MANIFEST in self.files:
            raise ConfigError(f"the manifest cannot list itself ({MANIFEST}).")
        if not isinstance(self.config, dict) or not isinstance(self.extra, dict):
            raise ConfigError("Manifest.config and Manifest.extra must be mappings.")
        clash = set(self.extra) & set(_CORE)
        if clash:
            raise ConfigError(f"Manifest.extra may not use the core keys {sorted(clash)}.")

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "name": self.name, "source": self.source, "config": self.config,
                **self.extra, "files": {n: r.to_dict() for n, r in sorted(self.files.items())}}

    @classmethod
    def from_dict(cls, meta: Any, name: str = "unknown") -> "Manifest":
        """Read this format or an older one; ``name`` fills in layouts that did not record it."""
        if not isinstance(meta, dict):
            raise ConfigError(f"a manifest must be a JSON object, got {type(meta).__name__}.")
        fmt = meta.get("format", FORMAT)
        if fmt != FORMAT and fmt not in LEGACY_FORMATS:
            raise ConfigError(f"manifest format {fmt!r} is not {FORMAT!r} (nor a legacy one: {LEGACY_FORMATS}).")
        files = meta.get("files")
        if not isinstance(files, dict):
            raise ConfigError("the manifest's 'files' is missing or not a mapping.")
        records = {}
        for fname, rec in files.items():
            try:
                records[fname] = FileRecord.from_dict(rec)
            except ConfigError as e:
                raise ConfigError(f"the manifest's entry for {fname!r} is invalid: {e}") from e
        extra = {k: v for k, v in meta.items() if k not in _CORE}
        return cls(name=str(meta.get("name", name)), source=str(meta.get("source", "unknown")), files=records,
                   config=dict(meta.get("config") or {}), extra=extra, format=FORMAT)

    def __getitem__(self, key: str) -> Any:
        """Dict-style access to the JSON fields (``meta["config"]``, ``meta["wheel_sha256"]``, ...)."""
        d = self.to_dict()
        return d[key]

    def __contains__(self, key: str) -> bool:
        return key in self.to_dict()


def file_records(directory: str | Path) -> dict[str, FileRecord]:
    """Size and sha256 of every regular file directly in ``directory`` except the manifest."""
    directory = Path(directory)
    return {p.name: FileRecord(size=p.stat().st_size, sha256=sha256_file(p))
            for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST}


def write_manifest(directory: str | Path, name: str, source: str, config: dict[str, Any] | None = None,
                   **extra: Any) -> Manifest:
    """Hash every file of ``directory`` and write its manifest (atomically, last: it marks the build complete)."""
    directory = Path(directory)
    manifest = Manifest(name=name, source=source, files=file_records(directory), config=dict(config or {}),
                        extra=extra)
    write_json(directory / MANIFEST, manifest.to_dict())
    return manifest


def read_manifest(directory: str | Path, *, what: str, fix: str, name: str = "unknown",
                  filename: str = MANIFEST) -> Manifest:
    """The manifest of ``directory``; ``CorruptFileError`` (with ``fix``) when it is missing or unreadable."""
    path = Path(directory) / filename
    try:
        return Manifest.from_dict(json.loads(path.read_text(encoding="utf-8")), name=name)
    except (OSError, ValueError, TypeError) as e:  # ConfigError and JSONDecodeError are ValueErrors
        raise CorruptFileError(f"{what} {directory} has no readable manifest {filename} ({type(e).__name__}: {e}); "
                               f"it is a partial or foreign copy and is not used. {fix}.") from e


def verify(directory: str | Path, *, what: str, fix: str, name: str = "unknown", required: tuple[str, ...] = (),
           deep: bool = True, filename: str = MANIFEST) -> Manifest:
    """Check ``directory`` against its manifest and return it; raise ``CorruptFileError`` if it is damaged.

    ``what`` names the model in messages ("the organism at"), ``fix`` is the sentence with the command that
    rebuilds it. Every listed file must exist with its recorded size; ``required`` files must be listed;
    ``deep=True`` also compares every recorded sha256."""
    directory = Path(directory)
    manifest = read_manifest(directory, what=what, fix=fix, name=name, filename=filename)
    absent = [f for f in required if f not in manifest.files]
    if absent:
        raise CorruptFileError(f"{what} {directory} is not a whole model: its manifest lists no {absent}. {fix}.")
    for fname, rec in manifest.files.items():
        f = directory / fname
        size = f.stat().st_size if f.is_file() else None
        if size != rec.size:
            got = "it is missing" if size is None else f"it has {size} bytes"
            raise CorruptFileError(f"{what} {directory} is damaged: {fname} has the wrong size (expected {rec.size} "
                                   f"bytes, {got}). {fix}.")
        if deep and rec.sha256 and sha256_file(f) != rec.sha256:
            raise CorruptFileError(f"{what} {directory} is damaged: {fname} does not match its sha256 in the "
                                   f"manifest. {fix}.")
    return manifest


def is_nonempty_dir(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and any(path.iterdir())
