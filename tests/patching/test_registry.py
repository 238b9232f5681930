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


@pytest.mark.parametrize("stage, where, match", [
    ("no_colon", "register", "must be a function or a 'module:function'"),
    (3, "register", "must be a function or a 'module:function'"),
    ("wordpos.patching.no_such_module:f", "run", "cannot be imported"),
    ("wordpos.patching.methods:no_such_stage", "run", "cannot be imported"),
])
def test_bad_stage_names_get_one_clear_error(monkeypatch, stage, where, match):
    monkeypatch.setattr(registry, "METHODS", dict(registry.METHODS))
    spec = registry.MethodSpec("bad", stage, ("layer",), (), "bad")
    if where == "register":
        with pytest.raises(ConfigError, match=match):
            registry.register(spec)
        assert "bad" not in registry.METHODS
    else:
        registry.register(spec)
        with pytest.raises(ConfigError, match=match):
            registry.get("bad").run(None)


def test_unknown_options_and_methods_are_refused(monkeypatch):
    monkeypatch.setattr(registry, "METHODS", dict(registry.METHODS))
    with pytest.raises(ConfigError, match="unknown options"):
        registry.register(registry.MethodSpec("x", "json:dumps", ("layer",), ("no_such_option",), "x"))
    with pytest.raises(ConfigError, match="registered methods are"):
        registry.get("no_such_method")
