"""The packages' lazy namespaces (probing.lazy) and the command line's garbage-collector pause (probing.heap)."""

import importlib
import json
import subprocess
import sys
import types

import pytest

from wordpos.probing.lazy import lazy_exports

PACKAGES = ["wordpos.probing", "wordpos.probing.engines", "wordpos.probing.models", "wordpos.patching",
            "wordpos.circuit"]


def _run(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_the_command_line_imports_no_heavy_library():
    got = _run("import sys, json, wordpos.circuit.cli, wordpos.probing, wordpos.patching\n"
               "wordpos.probing.errors, wordpos.probing.heap\n"
               "print(json.dumps(sorted(m for m in ('torch', 'transformers', 'sklearn', 'transformer_lens', "
               "'plotly', 'networkx') if m in sys.modules)))")
    assert got == []



def test_every_commands_help_imports_no_heavy_library():
    """``wordpos --help`` and each subcommand's ``--help`` are read from the registries and configs alone: building
    the parser imports neither torch nor scikit-learn (it used to import the methods, ~6 s), and the patch help
    still lists every command-line method and option."""
    got = _run("import contextlib, io, json, sys\n"
               "from wordpos.circuit.cli import build_parser\n"
               "helps = {}\n"
               "for cmd in ([], ['probe'], ['patch'], ['circuit'], ['run'], ['models']):\n"
               "    buf = io.StringIO()\n"
               "    with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):\n"
               "        build_parser().parse_args(cmd + ['--help'])\n"
               "    helps[' '.join(cmd)] = buf.getvalue()\n"
               "heavy = sorted(m for m in ('torch', 'transformers', 'sklearn', 'transformer_lens', 'plotly', "
               "'networkx', 'wordpos.patching.methods') if m in sys.modules)\n"
               "print(json.dumps([heavy, helps]))")
    heavy, helps = got
    assert heavy == []
    assert all(helps.values()) and set(helps) == {"", "probe", "patch", "circuit", "run", "models"}
    for word in ("activation", "attribution", "path", "ablation", "--n-pairs", "--top-k", "--receivers",
                 "--max-tokens", "--no-by-pos", "--ablation", "--metric"):
        assert word in helps["patch"], word
    assert "head_means" not in helps["patch"]  # registered, but not a command-line method

@pytest.mark.parametrize("package", PACKAGES)
def test_every_public_name_is_its_submodules_object(package):
    """Each name in ``__all__`` resolves (attribute access and ``from ... import``) to the object its submodule
    defines, under the same name; ``dir()`` lists it; anything else is an AttributeError."""
    pkg = importlib.import_module(package)
    assert pkg.__all__ and len(set(pkg.__all__)) == len(pkg.__all__)
    for name in pkg.__all__:
        value = getattr(pkg, name)
        assert not isinstance(value, types.ModuleType), name  # e.g. circuit.faithfulness: the function
        home = importlib.import_module(value.__module__) if hasattr(value, "__module__") and \
            not isinstance(value, (str, tuple, dict, list)) else None
        if home is not None and hasattr(home, name):
            assert getattr(home, name) is value, name
        assert name in dir(pkg)
    ns: dict = {}
    exec(f"from {package} import *", ns)
    assert set(pkg.__all__) <= set(ns)
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        pkg.not_a_name  # noqa: B018


def test_a_name_shared_with_its_submodule_stays_the_export():
    """``wordpos.circuit.faithfulness`` is the function (as the eager package had it), whether the submodule was
    imported before, after or never; the module stays reachable in ``sys.modules``."""
    got = _run("import json, sys\n"
               "from wordpos.circuit import faithfulness as a\n"
               "import wordpos.circuit.faithfulness\n"
               "from wordpos.circuit import faithfulness as b\n"
               "import wordpos.circuit as c\n"
               "m = sys.modules['wordpos.circuit.faithfulness']\n"
               "print(json.dumps([callable(a), a is b, c.faithfulness is m.faithfulness, type(m).__name__]))")
    assert got == [True, True, True, "module"]
    got = _run("import json, sys\n"
               "import wordpos.circuit.faithfulness\n"  # the submodule first: the import system sets the attribute
               "from wordpos.circuit import faithfulness\n"
               "print(json.dumps([callable(faithfulness), faithfulness.__module__]))")
    assert got == [True, "wordpos.circuit.faithfulness"]


def test_lazy_exports_imports_on_first_use(tmp_path, monkeypatch):
    (tmp_path / "lazypkg").mkdir()
    (tmp_path / "lazypkg" / "__init__.py").write_text(
        "from wordpos.probing.lazy import lazy_exports\n"
        "__getattr__, __dir__, __all__ = lazy_exports(__name__, {'heavy': ['thing', 'VALUE']})\n")
    (tmp_path / "lazypkg" / "heavy.py").write_text("VALUE = 3\ndef thing():\n    return 'x'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    pkg = importlib.import_module("lazypkg")
    assert "lazypkg.heavy" not in sys.modules and pkg.__all__ == ["VALUE", "thing"]
    assert pkg.VALUE == 3 and "lazypkg.heavy" in sys.modules
    assert pkg.thing is sys.modules["lazypkg.heavy"].thing and "thing" in vars(pkg)  # kept after first use
    assert pkg.heavy is sys.modules["lazypkg.heavy"]  # a submodule's name imports it
    (tmp_path / "lazypkg2").mkdir()
    (tmp_path / "lazypkg2" / "__init__.py").write_text(
        "from wordpos.probing.lazy import lazy_exports\n"
        "__getattr__, __dir__, __all__ = lazy_exports(__name__, {'thing': ['thing']})\n")
    (tmp_path / "lazypkg2" / "thing.py").write_text("def thing():\n    return 'x'\n")
    importlib.import_module("lazypkg2.thing")  # the import system sets the package attribute to the module
    assert sys.modules["lazypkg2"].thing is sys.modules["lazypkg2.thing"].thing
    with pytest.raises(AttributeError):
        pkg.light  # noqa: B018
    _, _, names = lazy_exports("x", {"a": ["b"]})
    assert names == ["b"]


def test_the_command_line_pauses_the_collector_until_the_model_is_loaded():
    """``wordpos`` pauses the collector through imports and loading, then freezes that heap and resumes; a library
    caller's collector is never touched; a command that loads no model resumes it unfrozen."""
    got = _run(
        "import gc, json\n"
        "from wordpos.probing import heap\n"
        "from wordpos.circuit.cli import main\n"
        "r = {}\n"
        "main(['models', 'list'])\n"
        "r['after_list'] = [gc.isenabled(), gc.get_freeze_count()]\n"
        "from wordpos.probing import load_model\n"
        "load_model('organism', device='cpu')\n"
        "r['library'] = [gc.isenabled(), gc.get_freeze_count()]\n"
        "heap.pause_until_loaded()\n"
        "r['paused'] = gc.isenabled()\n"
        "load_model('organism', device='cpu')\n"
        "r['loaded'] = [gc.isenabled(), gc.get_freeze_count()]\n"
        "gc.unfreeze()\n"
        "from wordpos.probing.engines import make_engine\n"
        "heap.pause_until_loaded()\n"
        "make_engine('organism', engine='nnsight', device='cpu')\n"  # not through load_model
        "r['nnsight'] = [gc.isenabled(), gc.get_freeze_count()]\n"
        "heap.resume()\n"
        "r['resumed'] = [gc.isenabled(), gc.get_freeze_count()]\n"
        "print(json.dumps(r))")
    assert got["after_list"] == [True, 0]
    assert got["library"] == [True, 0]
    assert got["paused"] is False
    assert got["loaded"][0] is True and got["loaded"][1] > 10_000
    assert got["nnsight"][0] is True and got["nnsight"][1] > 10_000
    assert got["resumed"] == [True, 0]  # main's end leaves the process as it found it
