"""Build ``.whl/``: the wheels a lent GPU machine (no network) needs to run ``scripts/device_run.sh`` (issue 14).

Which: every distribution whose modules the device scripts import here (an organism ``wordpos run``, the nnsight
engine, ``bench.py``, ``device_parity.py``, ``profile_circuit.py``, run in a child process of this venv), less those
the machine's image holds (``scripts/device_image.txt``). A package the image holds in another version than this
venv's is carried too when it is pure Python (transformers, huggingface-hub: the versions the tests ran with); a
compiled one (torch, numpy, tokenizers...) stays the image's, built for its CUDA and Python. Wheels are fetched for
the image's Python (3.12, manylinux x86-64) with ``pip download --no-deps``; wordpos itself is built from this
checkout. Stale wheels in ``.whl/`` are removed (two versions of one package stop the install there).

    .venv/bin/python scripts/device_wheels.py            # then run(carry=[".whl"], command="... device_run.sh")

Prints what it carries and why, and the total size (the device tool carries at most 64 MiB with the working tree).
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from packaging.utils import canonicalize_name, parse_wheel_filename

ROOT = Path(__file__).resolve().parent.parent
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64", "manylinux_2_24_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64",
             "manylinux_2_35_x86_64"]

# what the device scripts import, run in a fresh interpreter so that only their modules count
PROBE = r"""
import json, sys, tempfile
sys.path.insert(0, sys.argv[1] + "/scripts")
from wordpos.circuit.cli import main
main(["run", "--out", tempfile.mkdtemp() + "/run", "--quiet"])
from wordpos.probing.engines import make_engine
make_engine("organism", "nnsight", "cpu", False)
import bench, device_parity, profile_circuit  # noqa: F401
from wordpos.circuit.edge_circuit import load_stage_modules
load_stage_modules()
print("MODULES=" + json.dumps(sorted({m.split(".")[0] for m in list(sys.modules)})))
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
    """``name -> version`` of the distributions (of this venv) whose top-level modules the probe run imports."""
    res = subprocess.run([sys.executable, "-c", PROBE, str(ROOT)], capture_output=True, text=True, cwd=ROOT)
    line = next((x for x in res.stdout.splitlines() if x.startswith("MODULES=")), None)
    if res.returncode != 0 or line is None:
        raise SystemExit(f"the import probe failed (rc {res.returncode}):\n{res.stderr[-2000:]}")
    owners = md.packages_distributions()
    dists = {canonicalize_name(d) for top in json.loads(line[8:]) for d in owners.get(top, [])}
    return {d: md.version(d) for d in sorted(dists)}


def is_pure(name: str) -> bool:
    """Whether this venv's copy of ``name`` came from a pure-Python wheel (``Root-Is-Purelib: true``)."""
    wheel = md.distribution(name).read_text("WHEEL") or ""
    return "root-is-purelib: true" in wheel.lower()


def plan(imported: dict[str, str], image: dict[str, str | None]) -> dict[str, str]:
    """``name -> reason`` of the distributions to carry (wordpos itself is built, not listed)."""
    carry = {}
    for name, version in imported.items():
        if name == "wordpos":
            continue
        if name not in image:
            carry[name] = f"{version}: not in the image"
        elif image[name] is not None and image[name] != version and is_pure(name):
            carry[name] = f"{version}: the image has {image[name]} (pure Python: the tested version travels)"
    return carry


def unmet(wheels: list[Path], image: dict[str, str | None], python_version: str) -> list[str]:
    """``pip check`` for the machine, done here: each carried wheel's requirements (extras left out) against the
    carried versions and the image's versions, where known; the conflicts."""
    import zipfile

    from packaging.requirements import Requirement

    env = {"python_version": python_version, "python_full_version": python_version + ".3", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
    have: dict[str, str | None] = dict(image)
    have.update({canonicalize_name(str(parse_wheel_filename(w.name)[0])): str(parse_wheel_filename(w.name)[1])
                 for w in wheels})
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
    ap.add_argument("--python-version", default="3.12")
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
    with tempfile.TemporaryDirectory() as tmp:
        pins = [f"{name}=={imported[name]}" for name in carry]
        plat = [x for p in PLATFORMS for x in ("--platform", p)]
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--python-version", args.python_version, "--implementation", "cp", *plat, "-d", tmp, *pins],
                       check=True)
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp, str(ROOT)], check=True)
        fresh = {p.name: p for p in Path(tmp).glob("*.whl")}
        wanted = set(carry) | {"wordpos"}
        got = {canonicalize_name(str(parse_wheel_filename(n)[0])) for n in fresh}
        if wanted - got:
            raise SystemExit(f"no wheel came for {sorted(wanted - got)}; fetch them by hand (see the device tool's "
                             f"README) into {args.out}")
        for old in args.out.glob("*.whl"):  # one version of each package: the install refuses two
            if old.name not in fresh:
                old.unlink()
        for name, path in fresh.items():
            path.replace(args.out / name)
    wheels = sorted(args.out.glob("*.whl"))
    for problem in unmet(wheels, image, args.python_version):
        print("warning:", problem)
    total = sum(p.stat().st_size for p in wheels)
    print(f"{len(fresh)} wheels in {args.out}: {total / 2**20:.1f} MiB (the device tool carries 64 MiB with the "
          f"working tree)")


if __name__ == "__main__":
    main()
