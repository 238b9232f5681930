"""A full disk is one clear error and loses nothing: the atomic writers turn it into a ``DiskFullError`` naming the
file and folder, the residuals' spill refuses before a memory map could kill the process (SIGBUS), and a run that
stopped on it resumes. Simulated failures here; a real small tmpfs where this machine lets a test mount one."""

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import warnings
from types import SimpleNamespace

import numpy as np
import pytest

from wordpos.circuit.cli import main
from wordpos.probing import DiskFullError, as_engine, collect_residuals
from wordpos.probing import io


def _enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_in_an_atomic_write_is_one_error_and_keeps_the_old_file(tmp_path):
    io.write_text(tmp_path / "a.txt", "old")
    with pytest.raises(DiskFullError) as info:
        with io.atomic_path(tmp_path / "a.txt") as tmp:
            tmp.write_text("half")
            _enospc()
    e = info.value
    assert isinstance(e, OSError) and e.errno == errno.ENOSPC  # code that handles a full disk still catches it
    assert "a.txt" in str(e) and str(tmp_path) in str(e) and "free" in str(e) and "\n" not in str(e)
    assert isinstance(e.__cause__, OSError)  # the original error is kept for a traceback
    assert (tmp_path / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]  # no temporary left behind


def test_numpys_short_write_counts_as_a_full_disk_and_other_errors_pass_through(tmp_path):
    with pytest.raises(DiskFullError, match="x.npy"):  # numpy's tofile on a full disk: no errno, a short write
        with io.atomic_path(tmp_path / "x.npy"):
            raise OSError("2567936 requested and 784352 written")
    with pytest.raises(PermissionError) as info:
        with io.atomic_path(tmp_path / "y.npy"):
            raise PermissionError(errno.EACCES, "Permission denied")
    assert not isinstance(info.value, DiskFullError)


def test_a_full_disk_inside_a_folder_being_built_names_the_folder_a_user_knows(tmp_path):
    with pytest.raises(DiskFullError) as info:
        with io.atomic_dir(tmp_path / "ckpt" / "residuals") as tmp:
            with io.atomic_path(tmp / "resid_train.npy"):
                _enospc()
    msg = str(info.value)
    assert "resid_train.npy" in msg and f"holding {tmp_path / 'ckpt'} " in msg and ".partial" not in msg
    assert list((tmp_path / "ckpt").iterdir()) == []


def test_a_writers_temporary_is_never_the_name_in_the_message_and_used_up_inodes_say_so(tmp_path, monkeypatch):
    with pytest.raises(DiskFullError) as info:
        with io.atomic_path(tmp_path / "f2.json") as tmp:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
    assert "while writing f2.json " in str(info.value) and ".tmp" not in str(info.value)
    st = os.statvfs(tmp_path)
    fields = {k: getattr(st, k) for k in dir(st) if k.startswith("f_") and k != "f_fsid"}
    monkeypatch.setattr(io.os, "statvfs", lambda _p: SimpleNamespace(**{**fields, "f_files": 4, "f_favail": 0}))
    with pytest.raises(DiskFullError, match="inodes are used up"):
        _raise_in(tmp_path / "g.txt")


def _raise_in(path):
    with io.atomic_path(path):
        _enospc()


def test_the_spill_refuses_before_any_forward_when_the_disk_is_too_small(tiny_model, small_data, tmp_path,
                                                                         monkeypatch):
    engine_cls = type(as_engine(tiny_model))
    calls = []
    run = engine_cls.run
    monkeypatch.setattr(engine_cls, "run", lambda self, *a, **k: calls.append(1) or run(self, *a, **k))
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(io.shutil, "disk_usage", lambda _p: usage._replace(free=1000))
    with pytest.raises(DiskFullError, match="spill_dir=") as info:
        collect_residuals(tiny_model, small_data, layers=[1], progress=False, max_memory_mb=0.01,
                          spill_dir=tmp_path / "spill")
    assert "max_memory_mb" in str(info.value) and calls == []
    assert f"holding {tmp_path}," in str(info.value)  # the folder the caller knows, not a temporary one
    assert not (tmp_path / "spill").exists() or list((tmp_path / "spill").iterdir()) == []
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "t"))  # the default folder: refused before it is made
    (tmp_path / "t").mkdir()
    with pytest.raises(DiskFullError):
        collect_residuals(tiny_model, small_data, layers=[1], progress=False, max_memory_mb=0.01)
    assert list((tmp_path / "t").iterdir()) == []


def test_a_rerun_into_the_same_spill_folder_counts_the_files_it_replaces(tiny_model, small_data, tmp_path,
                                                                          monkeypatch):
    spill = tmp_path / "spill"
    a = collect_residuals(tiny_model, small_data, layers=[1], progress=False, max_memory_mb=0.01, spill_dir=spill)
    size = sum(f.stat().st_size for f in spill.iterdir())
    del a
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(io.shutil, "disk_usage", lambda _p: usage._replace(free=size // 2))  # room for half of it
    b = collect_residuals(tiny_model, small_data, layers=[1], progress=False, max_memory_mb=0.01, spill_dir=spill)
    assert b.train(1).shape[0] > 0


def test_a_file_in_a_named_spill_folder_that_cannot_be_opened_is_left_alone(tiny_model, small_data, tmp_path,
                                                                            monkeypatch):
    spill = tmp_path / "spill"
    spill.mkdir()
    (spill / "resid_train.npy").write_text("the user's")

    def refuse(*_a, **_k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(np.lib.format, "open_memmap", refuse)
    with pytest.raises(PermissionError):
        collect_residuals(tiny_model, small_data, layers=[1], progress=False, max_memory_mb=0.01, spill_dir=spill)
    assert (spill / "resid_train.npy").read_text() == "the user's"


@pytest.mark.skipif(not hasattr(os, "posix_fallocate"), reason="no posix_fallocate on this platform")
def test_a_failed_reservation_is_a_disk_full_error_and_leaves_no_spill_files(tiny_model, small_data, tmp_path,
                                                                             monkeypatch):
    monkeypatch.setattr(io.os, "posix_fallocate", _enospc)  # the disk filled after the up-front check
    with pytest.raises(DiskFullError, match="resid_train.npy"):
        collect_residuals(tiny_model, small_data, layers=[1], progress=False, max_memory_mb=0.01,
                          spill_dir=tmp_path / "spill")
    assert list((tmp_path / "spill").iterdir()) == []


def test_the_cli_reports_a_full_disk_met_anywhere_in_one_line(tiny_gpt2_dir, tmp_path, monkeypatch, capsys):
    import wordpos.probing.experiment as experiment

    monkeypatch.setattr(experiment, "collect_residuals", _enospc)  # not one of wordpos' own writers
    out = tmp_path / "run"
    assert main(["probe", "--model", str(tiny_gpt2_dir), "--layer", "1", "--out", str(out), "--n-prompts", "40",
                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip()  # the error names no file, and --out's disk has room: no disk named
    assert err.startswith("wordpos probe: error: a disk is full ([Errno 28]") and "\n" not in err
    assert "resumes" in err and "Traceback" not in err
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage._replace(free=2**20))  # --out's disk nearly full
    assert main(["probe", "--model", str(tiny_gpt2_dir), "--layer", "1", "--out", str(out), "--n-prompts", "40",
                 "--quiet", "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"wordpos probe: error: no space left on the disk holding {out} while writing probe's ")
    assert err.endswith("run the command again without --overwrite to resume from it.")


# ------------------------------------------------------------------ a real full disk (a small tmpfs), where allowed
@pytest.fixture
def small_disk(tmp_path):
    """A 1 MB tmpfs (root on Linux only); ``resize(mb)`` grows it as freeing space would. Skipped where mounting,
    resizing or unmounting one is not allowed (a container without the capability)."""
    disk = tmp_path / "disk"
    disk.mkdir()

    def sh(*args: str) -> bool:
        return subprocess.run(list(args), capture_output=True).returncode == 0

    if sys.platform != "linux" or shutil.which("mount") is None or not sh("mount", "-t", "tmpfs", "-o", "size=1M",
                                                                          "tmpfs", str(disk)):
        pytest.skip("cannot mount a small tmpfs here (needs root on Linux)")
    if not sh("mount", "-o", "remount,size=1M", str(disk)):
        sh("umount", "-l", str(disk))
        pytest.skip("cannot resize a tmpfs here")

    def resize(mb: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={mb}M", str(disk)], check=True)

    try:
        yield SimpleNamespace(path=disk, resize=resize)
    finally:
        if not sh("umount", "-l", str(disk)):
            warnings.warn(f"could not unmount the test's tmpfs at {disk}", stacklevel=1)


@pytest.mark.slow
def test_on_a_really_full_disk_the_spill_raises_instead_of_dying_and_a_run_resumes(small_disk, tmp_path):
    code = textwrap.dedent(f"""
        from wordpos.probing import WordIndexDataset, collect_residuals, load_model
        model = load_model("organism")
        data = WordIndexDataset.default(model.tokenizer, n_prompts=512, seed=0)
        collect_residuals(model, data, layers="all", max_memory_mb=0.5, spill_dir={str(small_disk.path / 'spill')!r},
                          progress=False)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]  # before: -7, killed by SIGBUS writing to the memory map
    assert "DiskFullError" in proc.stderr and "spill_dir=" in proc.stderr

    small_disk.resize(8)  # room for the probe's stage only
    cli = [sys.executable, "-m", "wordpos.circuit.cli", "run", "--quiet"]
    ref = subprocess.run(cli + ["--out", str(tmp_path / "ref")], capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-2000:]
    full = subprocess.run(cli + ["--out", str(small_disk.path / "run")], capture_output=True, text=True, timeout=600)
    lines = [ln for ln in full.stderr.splitlines() if ln.startswith("wordpos run:")]
    assert full.returncode == 2 and len(lines) == 1 and "Traceback" not in full.stderr, full.stderr[-2000:]
    assert "no space left on the disk holding" in lines[0] and "resumes" in lines[0]
    small_disk.resize(200)  # space freed: the same command resumes
    again = subprocess.run(cli + ["--out", str(small_disk.path / "run")], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout == ref.stdout.replace(str(tmp_path / "ref"), str(small_disk.path / "run"))
    a = json.loads((tmp_path / "ref" / "summary.json").read_text())
    b = json.loads((small_disk.path / "run" / "summary.json").read_text())
    assert a["probe"] == b["probe"] and a["top_heads"] == b["top_heads"]
    for stage, keys in (("ablation", ("accuracy", "refit_accuracy", "random_accuracies")),
                        ("circuit", ("edges", "faithfulness", "cpr", "cmd"))):
        assert [a[stage][k] for k in keys] == [b[stage][k] for k in keys], stage
