"""A small mutation pass: does the test suite notice when the core code is wrong?

For each module given, every arithmetic/comparison operator, boolean operator, unary minus and small integer
constant inside the named functions is a candidate mutant (``a - b`` -> ``a + b``, ``<`` -> ``<=``, ``and`` ->
``or``, ``-x`` -> ``x``, ``0`` -> ``1``, ...). A seeded sample of them is applied one at a time (the file is
rewritten, then restored), the given tests run, and a mutant is *killed* when they fail. Prints the kill rate and
each survivor, and writes JSON with ``--out``.

    python scripts/mutation_pass.py --target patching/results.py:EffectResult.top_heads \\
        --tests tests/patching/test_results.py --n 20

(mutmut does the same at scale; this needs no extra package and runs on 2 cores in minutes.)

It rewrites the target files in place while a mutant is tested (and restores them, also on Ctrl-C): run nothing
else from this checkout meanwhile, since any process that imports wordpos then may load a mutant.
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SWAP_BIN = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Mult,
            ast.Mod: ast.FloorDiv, ast.Pow: ast.Mult, ast.MatMult: ast.Mult}
SWAP_CMP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
            ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}


@dataclass
class Mutant:
    file: str
    function: str
    line: int
    col: int
    kind: str
    description: str
    killed: bool | None = None
    seconds: float = 0.0


def _functions(tree: ast.Module, names: list[str] | None):
    """(qualified name, node) of each function in ``tree`` whose name is in ``names`` (all when None)."""
    out = []

    def visit(node, prefix=""):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                q = f"{prefix}{child.name}"
                if names is None or q in names or child.name in names:
                    out.append((q, child))

    visit(tree)
    return out


def candidates(path: Path, names: list[str] | None) -> list[tuple[Mutant, callable]]:
    """Every mutant of the named functions in ``path``, with a function that applies it to a fresh tree."""
    src = path.read_text()
    tree = ast.parse(src)
    found = []
    for qname, fn in _functions(tree, names):
        for node in ast.walk(fn):
            if isinstance(node, ast.BinOp) and type(node.op) in SWAP_BIN:
                new = SWAP_BIN[type(node.op)].__name__
                found.append((qname, node, "binop", f"{type(node.op).__name__} -> {new}"))
            elif isinstance(node, ast.Compare) and type(node.ops[0]) in SWAP_CMP:
                new = SWAP_CMP[type(node.ops[0])].__name__
                found.append((qname, node, "compare", f"{type(node.ops[0]).__name__} -> {new}"))
            elif isinstance(node, ast.BoolOp):
                found.append((qname, node, "boolop", f"{type(node.op).__name__} -> {'Or' if isinstance(node.op, ast.And) else 'And'}"))
            elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Not)):
                found.append((qname, node, "unary", f"drop {type(node.op).__name__}"))
            elif isinstance(node, ast.Constant) and type(node.value) is int and abs(node.value) <= 2:
                found.append((qname, node, "const", f"{node.value} -> {node.value + 1}"))
    out = []
    for qname, node, kind, desc in found:
        key = (node.lineno, node.col_offset, kind)
        m = Mutant(str(path.relative_to(ROOT)), qname, node.lineno, node.col_offset, kind, desc)

        def apply(key=key, src=src):
            t = ast.parse(src)
            for n in ast.walk(t):
                if (getattr(n, "lineno", None), getattr(n, "col_offset", None)) != key[:2]:
                    continue
                k = key[2]
                if k == "binop" and isinstance(n, ast.BinOp) and type(n.op) in SWAP_BIN:
                    n.op = SWAP_BIN[type(n.op)]()
                elif k == "compare" and isinstance(n, ast.Compare) and type(n.ops[0]) in SWAP_CMP:
                    n.ops[0] = SWAP_CMP[type(n.ops[0])]()
                elif k == "boolop" and isinstance(n, ast.BoolOp):
                    n.op = ast.Or() if isinstance(n.op, ast.And) else ast.And()
                elif k == "unary" and isinstance(n, ast.UnaryOp):
                    n.op = ast.UAdd()  # -x -> +x; not x -> +x (same truth value as x)
                elif k == "const" and isinstance(n, ast.Constant) and type(n.value) is int:
                    n.value = n.value + 1
                else:
                    continue
                return ast.unparse(t)
            raise RuntimeError(f"mutation point {key} not found again")

        out.append((m, apply))
    return out


def run_tests(tests: list[str], timeout: float) -> bool:
    """True when the tests pass."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False  # a mutant that hangs the tests is caught
    return r.returncode == 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", action="append", required=True,
                    help="FILE[:func1,Class.method,...] (repeatable); all functions when none are named")
    ap.add_argument("--tests", nargs="+", required=True, help="pytest arguments that should kill the mutants")
    ap.add_argument("--n", type=int, default=20, help="mutants to sample (all when larger than the candidates)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    pool = []
    for t in args.target:
        file, _, funcs = t.partition(":")
        pool += candidates(ROOT / file, funcs.split(",") if funcs else None)
    if not pool:
        print("no mutation points found")
        return 1
    if not run_tests(args.tests, args.timeout):
        print("the tests fail on the unmutated code; fix them first")
        return 1
    rng = random.Random(args.seed)
    sample = rng.sample(pool, min(args.n, len(pool)))
    print(f"{len(pool)} candidate mutants, running {len(sample)}")
    for m, apply in sample:
        path = ROOT / m.file
        original = path.read_text()
        try:
            path.write_text(apply())
            t0 = time.perf_counter()
            m.killed = not run_tests(args.tests, args.timeout)
            m.seconds = round(time.perf_counter() - t0, 1)
        finally:
            path.write_text(original)
        print(f"{'killed  ' if m.killed else 'SURVIVED'} {m.file}:{m.line} {m.function}: {m.description}", flush=True)
    killed = sum(m.killed for m, _ in sample)
    print(f"kill rate: {killed}/{len(sample)} = {killed / len(sample):.0%}")
    if args.out:
        args.out.write_text(json.dumps({"killed": killed, "n": len(sample), "candidates": len(pool),
                                        "tests": args.tests, "mutants": [asdict(m) for m, _ in sample]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
