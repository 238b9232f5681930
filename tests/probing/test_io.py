"""Output files and directories are created with the modes the user's umask gives (not mkstemp's 0600 /
mkdtemp's 0700), so a shared run directory or a served report stays readable."""

import os
import stat

import pytest

from wordpos.probing import io

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX modes")


@pytest.fixture(params=[0o022, 0o002, 0o077, 0o027])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_current_umask_reads_without_changing(umask):
    assert io.current_umask() == umask
    assert io.current_umask() == umask


def test_atomic_files_follow_the_umask(tmp_path, umask):
    # the reference: what a plain open()/mkdir() gives under this umask
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    (tmp_path / "plain_dir").mkdir()
    expected_file = {0o022: 0o644, 0o002: 0o664, 0o077: 0o600, 0o027: 0o640}[umask]
    assert _mode(plain) == expected_file
    written = [io.write_text(tmp_path / "a.txt", "hello"), io.write_json(tmp_path / "b.json", {"x": 1}),
               io.write_npz(tmp_path / "c.npz", a=[1, 2])]
    for f in written:
        assert _mode(f) == _mode(plain) == expected_file, f
    io.write_text(tmp_path / "a.txt", "again")  # replacing an existing file too
    assert _mode(tmp_path / "a.txt") == expected_file
    with io.atomic_dir(tmp_path / "built") as d:
        (d / "inner.txt").write_text("y")
        io.write_text(d / "inner2.txt", "z")
        (d / "sub").mkdir(mode=0o700)
        (d / "sub" / "secret.bin").write_bytes(b"w")
        os.chmod(d / "sub" / "secret.bin", 0o600)  # as save_pretrained's safetensors writer leaves its file
    built = tmp_path / "built"
    assert _mode(built) == _mode(built / "sub") == _mode(tmp_path / "plain_dir") == 0o777 & ~umask
    for f in ("inner.txt", "inner2.txt", "sub/secret.bin"):
        assert _mode(built / f) == expected_file, f
    assert io.read_json(tmp_path / "b.json") == {"x": 1}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with io.atomic_path(tmp_path / "f.txt") as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
