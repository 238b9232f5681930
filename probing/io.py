"""Atomic, self-describing output: every file is written to a temporary name and renamed into place,
and every run directory records its config, the package versions and the model it was run on."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import numbers
import os
import platform
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from wordpos.probing.errors import ConfigError, CorruptFileError, DiskFullError, RunDirError

RUN_MARKER = "config.json"


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if hasattr(obj, "tolist"):  # torch tensors
        return obj.tolist()
    return obj


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (``/proc/self/status`` on Linux;
    elsewhere set-and-restore, which is not thread-safe but brief)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a new file gets under the user's umask (``0o666 & ~umask``): what ``open()`` would give."""
    return 0o666 & ~current_umask()


def _size(n: float) -> str:
    return f"{n / 2**20:.1f} MB" if n < 2**30 else f"{n / 2**30:.1f} GB"


_TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.(?:partial|tmp)$")  # atomic_dir's and atomic_path's temporaries


def existing_parent(path: Path) -> Path:
    """``path`` or its nearest existing parent outside the atomic writers' temporary folders (the folder a user
    knows, on the disk a new file there lands on)."""
    path = Path(os.path.abspath(path))
    while path != path.parent and (not path.exists() or any(_TEMP_NAME.match(part) for part in path.parts)):
        path = path.parent
    return path


def _out_of_inodes(where: Path) -> bool:
    try:
        st = os.statvfs(where)
    except (OSError, AttributeError):  # (no statvfs on Windows)
        return False
    return st.f_files > 0 and st.f_favail == 0


def disk_full_error(e: OSError, path: str | os.PathLike | None, what: str | None = None,
                    atomic: bool = True) -> DiskFullError | None:
    """The one-line :class:`DiskFullError` for ``e`` raised while writing ``path`` (``None``: unknown, and ``e``
    does not name its file either; ``what``: how to name it when ``e`` does not name its file; ``atomic``: it was
    one of the atomic writers, which remove their partial file), or ``None`` when ``e`` is not a full disk. numpy's
    ``tofile`` reports a full disk as a short write without an errno ("N requested and M written")."""
    if isinstance(e, DiskFullError):
        return e
    short_write = e.errno is None and "requested and" in str(e) and "written" in str(e)
    if e.errno not in (errno.ENOSPC, errno.EDQUOT) and not short_write:
        return None
    named = Path(e.filename) if isinstance(e.filename, (str, os.PathLike)) else None
    if named is not None and _TEMP_NAME.match(named.name) and path is not None:
        named = None  # the writer's temporary: name the file it stands for
    target = named or (Path(path) if path is not None else None)
    kept = ": the half-written file was removed and nothing written before was changed" if atomic else ""
    if target is None:
        return DiskFullError(f"a disk is full ({e}){kept}. Free some space and run it again.")
    what = target.name if named is not None or what is None else what
    where = existing_parent(target.parent)
    full = ("no room for new files on the disk holding {where} (its inodes are used up)" if _out_of_inodes(where)
            else "no space left on the disk holding {where}").format(where=where)
    return DiskFullError(f"{full} while writing {what} ({_size(shutil.disk_usage(where).free)} free){kept}. Free "
                         "some space there (or write to another disk) and run it again.")


def check_free_space(path: str | os.PathLike, need_bytes: int, what: str, fix: str) -> None:
    """Refuse, before writing anything, ``need_bytes`` more than the disk holding ``path`` has free."""
    where = existing_parent(Path(path))
    free = shutil.disk_usage(where).free
    if need_bytes > free:
        raise DiskFullError(f"{what} needs {_size(need_bytes)} on the disk holding {where}, which has "
                            f"{_size(free)} free; {fix}.")


def preallocate(path: str | os.PathLike, size: int) -> None:
    """Reserve ``size`` bytes of disk for the (sparse) file ``path``, so that a full disk fails here with a
    :class:`DiskFullError` instead of killing the process (SIGBUS) in a later write to a memory map of it."""
    if size <= 0 or not hasattr(os, "posix_fallocate"):
        return
    with open(path, "r+b") as f, disk_full_as_error(Path(path)):
        try:
            os.posix_fallocate(f.fileno(), 0, size)
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):  # (a filesystem without it: nothing reserved)
                raise


@contextlib.contextmanager
def disk_full_as_error(path: Path) -> Iterator[None]:
    """Re-raise a full disk met while writing ``path`` as a :class:`DiskFullError` (other errors as they are)."""
    try:
        yield
    except OSError as e:
        err = disk_full_error(e, path)
        if err is None or err is e:
            raise
        raise err from e


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path`` in one step,
    on failure it is removed, so a reader never sees a half-written file.

    ``mkstemp`` creates the temporary file 0600; before the rename it gets the mode the user's umask gives
    any new file, so a shared run directory or a served report stays readable to others."""
    path = Path(path)
    with disk_full_as_error(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        try:
            yield tmp_path
            if tmp_path.exists():
                os.chmod(tmp_path, file_mode())
            os.replace(tmp_path, path)
        finally:
            if tmp_path.exists():
                tmp_path.unlink()


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(_jsonable(obj), indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike, what: str = "result file") -> Any:
    """Read JSON, turning a truncated or malformed file into one clear error."""
    path = Path(path)
    if not path.exists():
        raise CorruptFileError(f"{what} {path} does not exist; run the step that writes it first.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptFileError(
            f"{what} {path} is not valid JSON ({e}); it is truncated or not ours. "
            "Delete it and re-run the step that writes it."
        ) from e


def save_record(record: dict[str, Any], directory: str | os.PathLike, name: str) -> Path:
    """Write a result's dict as ``{directory}/{name}.json`` (atomically; the writer creates the directory)."""
    return write_json(Path(directory) / f"{name}.json", record)


def load_record(path: str | os.PathLike, name: str, what: str) -> Any:
    """Read a result's dict from ``path`` (a file, or a directory holding ``{name}.json``)."""
    path = Path(path)
    return read_json(path / f"{name}.json" if path.is_dir() else path, what)


def record_from_dict(cls: Any, d: Any, fmt: str, what: str, file_what: str, fix: str = "",
                     convert: Any = None) -> Any:
    """``cls(**d)`` for a result dict written with format ``fmt`` (the ``format`` key dropped; ``convert`` turns
    what JSON gave back into ``cls``' arguments, e.g. lists into tuples); another format, missing or foreign fields
    are a CorruptFileError naming ``what`` and how to get a good file."""
    if not isinstance(d, dict) or d.get("format") != fmt:
        raise CorruptFileError(f"not {what} (format {d.get('format') if isinstance(d, dict) else d!r}, expected "
                               f"{fmt!r}); write it with {cls.__name__}.save.")
    try:
        kwargs = {k: v for k, v in d.items() if k != "format"}
        return cls(**(convert(kwargs) if convert is not None else kwargs))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CorruptFileError(f"the {file_what} file does not match {cls.__name__}'s fields ({type(e).__name__}: "
                               f"{e}){fix}.") from e


def write_npz(path: str | os.PathLike, **arrays: Any) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})
    return Path(path)


def read_npz(path: str | os.PathLike, what: str = "array file") -> dict[str, np.ndarray]:
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError as e:
        raise CorruptFileError(f"{what} {path} does not exist; run the step that writes it first.") from e
    except Exception as e:  # zipfile.BadZipFile, ValueError, EOFError ...
        raise CorruptFileError(
            f"{what} {path} cannot be read ({type(e).__name__}: {e}); it is truncated or not ours. "
            "Delete it and re-run the step that writes it."
        ) from e


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a directory under a temporary name and rename it into place when complete.

    ``mkdtemp`` creates it 0700, and some writers (``save_pretrained``'s safetensors) create files 0600; before
    the rename, the directory and everything in it get the modes the user's umask gives new directories and
    files (executables keep their x bits), so a cache or run shared between users stays readable."""
    path = Path(path)
    with disk_full_as_error(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
        try:
            yield tmp
            _apply_umask_modes(tmp)
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def _apply_umask_modes(root: Path) -> None:
    """Give ``root`` and every entry below it the mode a fresh ``mkdir``/``open`` would have under the umask."""
    mask = current_umask()
    os.chmod(root, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o777 & ~mask)
        for f in filenames:
            p = os.path.join(dirpath, f)
            if os.path.islink(p):
                continue
            executable = os.stat(p).st_mode & 0o111
            os.chmod(p, (0o777 if executable else 0o666) & ~mask)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def config_identity(config: Any, exclude: tuple[str, ...]) -> dict[str, Any]:
    """A config dataclass as a dict without the settings that do not change results (device, engine, ...):
    what decides whether a run directory holds "the same run"."""
    d = dataclasses.asdict(config)
    for k in exclude:
        d.pop(k, None)
    return d


def versions() -> dict[str, str]:
    """Versions of Python and of every package whose numbers the results depend on."""
    from importlib import metadata

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in ("wordpos", "torch", "transformer-lens", "transformers", "nnsight", "scikit-learn",
                 "numpy", "einops", "networkx", "plotly", "wordfreq"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def check_seed(seed: Any) -> None:
    """A run's seed (every config that draws from numpy's generators checks it here): a non-negative integer
    (numpy's generators take no negative seeds)."""
    if not isinstance(seed, numbers.Integral) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer (numpy's generators take no negative seeds), got "
                          f"{seed!r}.")


#: config keys whose values are filesystem paths: compared as absolute paths, so that a run addressed by another
#: path to the same place (``runs/x`` from one directory, ``/abs/runs/x`` or ``./runs/x``) still resumes
PATH_KEYS = frozenset({"probe", "checkpoint_dir"})


def _comparable(config: Any) -> Any:
    """``config`` with the values of :data:`PATH_KEYS` made absolute (relative ones against this process's
    working directory, where a run started from the same place had saved them)."""
    if isinstance(config, dict):
        return {k: os.path.abspath(v) if k in PATH_KEYS and isinstance(v, str) and v else _comparable(v)
                for k, v in config.items()}
    return config


def _holds_results(out: Path) -> bool:
    """Whether ``out`` holds any file besides run markers (``config.json``), at any depth: a run that failed on
    its settings before writing anything leaves only its markers, and those are no results to protect."""
    return any(p.name != RUN_MARKER for p in out.rglob("*") if not p.is_dir())


def _marker_record(out: Path) -> dict[str, Any] | None:
    """The run marker's record (``{"config", "versions"[, "outputs"]}``), or None when missing or unreadable."""
    try:
        record = json.loads((out / RUN_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("config"), dict) else None


def _owned(out: Path, stage: str, outputs: tuple[str, ...]) -> list[str]:
    """Which of ``outputs`` (a stage's folders and files, top-level names in ``out``) the ``stage`` run recorded in
    ``out`` wrote: those its marker lists, or, for a marker written before the list existed, those present."""
    record = _marker_record(out)
    if record is None or record["config"].get("stage") != stage:
        return []
    listed = record.get("outputs")
    names = listed if isinstance(listed, list) else [n for n in outputs if (out / n).exists()]
    return [n for n in outputs if n in names]  # only names the caller writes: a marker cannot point elsewhere


def remove_replaced_outputs(out: str | os.PathLike, stage: str, outputs: tuple[str, ...]) -> list[str]:
    """Before ``--overwrite`` replaces the ``stage`` run recorded in ``out``: remove what that run wrote (of
    ``outputs``), so that none of its files is left to be read as the new run's. A folder or file of those names
    that was there before the run (it was written into a directory holding other things) is not the run's, and
    stays, as does everything else. Returns the names removed."""
    out = Path(out)
    removed = []
    for name in _owned(out, stage, outputs):
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


def prepare_run_dir(out: str | os.PathLike, config: dict[str, Any], *, overwrite: bool = False,
                    resume: bool = True, outputs: tuple[str, ...] = ()) -> Path:
    """Create ``out`` for a run with ``config``; refuse a directory holding a different run.

    A directory whose ``config.json`` equals ``config`` (ignoring versions; path settings compared as absolute
    paths) is reused so that a re-run resumes; any other existing run is refused unless ``overwrite`` is given,
    except one that holds no results (a run that stopped on a bad setting leaves only its ``config.json``: the
    corrected command takes the directory over).

    ``outputs`` names what the run writes at the top of ``out``; the marker records which of them the run owns
    (those not already there when it first wrote the directory), so that :func:`remove_replaced_outputs` removes
    only its own.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"{out} is a file, not a directory: pass a directory path as --out (it is created if "
                          "missing).")
    marker = out / RUN_MARKER
    record = {"config": _jsonable(config), "versions": versions()}
    if outputs:
        before = _owned(out, str(config.get("stage")), outputs) if out.is_dir() else []
        record["outputs"] = [n for n in outputs if n in before or not (out / n).exists()]
    if marker.exists() and not overwrite and _holds_results(out):
        try:
            old = json.loads(marker.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RunDirError(f"{marker} is not readable JSON ({e}), so {out} cannot be checked or resumed. Choose "
                              "a new --out directory, or pass --overwrite to replace that run.") from e
        if not (resume and isinstance(old, dict)
                and _comparable(old.get("config")) == _comparable(record["config"])):
            raise RunDirError(
                f"{out} already holds the results of another run (its {RUN_MARKER} differs from this "
                "run's settings). Choose a new --out directory, or pass --overwrite to replace it."
            )
    elif out.exists() and any(out.iterdir()) and not overwrite and not marker.exists():
        raise RunDirError(
            f"{out} exists and is not empty but holds no wordpos run. Choose a new --out directory, "
            "or pass --overwrite to write into it anyway."
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_json(marker, record)
    except OSError as e:
        raise RunDirError(f"cannot write the run directory {out} ({e.strerror or e}): choose a writable --out "
                          "directory.") from e
    return out
