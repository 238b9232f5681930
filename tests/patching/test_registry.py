"""The method registry: built-in methods named as "module:function" resolve to the stage functions of
:mod:`wordpos.patching.methods`; methods registered by other code run; bad specs get one clear error."""

import importlib
import inspect

import pytest

from wordpos.patching import registry
from wordpos.probing import ConfigError


def test_builtin_methods_resolve_to_the_stage_functions():
    methods = importlib.import_module("wordpos.patching.methods")
    stages = {n: f for n, f in inspect.getmembers(methods, inspect.isfunction) if n.endswith("_stage")}
    found = registry.methods()
    assert {"activation", "attribution", "path", "ablation", "head_means", "roles"} <= set(found)
    for name, spec in found.items():
        assert spec.function() is stages[f"{name}_stage"], name
    # every stage function of the module is registered (none forgotten when the list moved into the registry)
    assert {f.__name__ for f in stages.values()} == {registry.get(n).function().__name__ for n in found}
    assert set(registry.methods(cli_only=True)) == {"activation", "attribution", "path", "ablation"}


def test_a_method_registered_with_a_function_or_a_name_runs(monkeypatch):
    monkeypatch.setattr(registry, "METHODS", dict(registry.METHODS))
    seen = []
    registry.register(registry.MethodSpec("mine", lambda inp: seen.append(inp) or "out", ("layer",), ("top_k",),
                                          "a test method"))
    assert registry.get("mine").run("inputs") == "out" and seen == ["inputs"]
    registry.register(registry.MethodSpec("named", "json:dumps", ("layer",), (), "by name"))
    assert registry.get("named").run([1, 2]) == "[1, 2]"
    assert "mine" in registry.methods(cli_only=True) and "--top-k" in {o.flag for o in registry.cli_options()}
    # the keyword and dataclasses.replace of the field still work as before the registry named stages lazily
    import dataclasses

    spec = dataclasses.replace(registry.get("activation"), run=lambda inp: "replaced")
    assert spec.run(None) == "replaced" and spec.function()(None) == "replaced"
    assert registry.MethodSpec("kw", run="json:dumps", axes=(), options=(), help="").run({}) == "{}"


@pytest.mark.parametrize("stage", ["no_colon", 3])
def test_a_stage_that_is_neither_a_function_nor_a_name_is_refused(stage):
    with pytest.raises(ConfigError, match="function or a 'module:function'"):
        registry.MethodSpec("bad", stage, ("layer",), (), "bad")


@pytest.mark.parametrize("stage, match", [("wordpos.patching.no_such_module:f", "there is no module"),
                                          ("wordpos.patching.methods:no_such_stage", "has no function")])
def test_a_stage_that_cannot_be_found_is_one_clear_error(monkeypatch, stage, match):
    monkeypatch.setattr(registry, "METHODS", dict(registry.METHODS))
    registry.register(registry.MethodSpec("bad", stage, ("layer",), (), "bad"))
    with pytest.raises(ConfigError, match=match):
        registry.get("bad").run(None)


def test_a_module_that_fails_inside_raises_its_own_error(tmp_path, monkeypatch):
    """A dependency missing inside the stage's module is that dependency's error (which names what to install),
    not advice to re-register the method."""
    (tmp_path / "stage_needs_dep.py").write_text("import no_such_dependency_xyz\ndef stage(inp):\n    return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = registry.MethodSpec("dep", "stage_needs_dep:stage", ("layer",), (), "dep")
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_xyz"):
        spec.run(None)


def test_unknown_options_and_methods_are_refused(monkeypatch):
    monkeypatch.setattr(registry, "METHODS", dict(registry.METHODS))
    with pytest.raises(ConfigError, match="unknown options"):
        registry.register(registry.MethodSpec("x", "json:dumps", ("layer",), ("no_such_option",), "x"))
    with pytest.raises(ConfigError, match="registered methods are"):
        registry.get("no_such_method")
