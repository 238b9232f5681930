import time

import pytest
import torch

from wordpos.probing import ConfigError, ModelNotAvailableError, load_model
from wordpos.probing.models import registry as M


def test_local_dir_loads_as_bridge_and_matches_hf(tiny_gpt2_dir, tiny_model, gpt2_tok):
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir).eval()
    toks = torch.tensor([gpt2_tok.encode("Hello world. When the cat sat")])
    with torch.no_grad():
        ours = tiny_model(toks)
        ref = hf(toks).logits
    assert type(tiny_model).__name__ == "TransformerBridge"
    assert (ours - ref).abs().max() < 1e-4
    assert tiny_model.cfg.n_layers == 2 and tiny_model.cfg.n_heads == 4


def test_unknown_hub_model_fails_fast_and_clearly(monkeypatch):
    monkeypatch.setattr(M, "_hub_reachable", lambda timeout=3.0: False)
    t0 = time.perf_counter()
    with pytest.raises(ModelNotAvailableError, match="organism"):
        load_model("gpt2")
    assert time.perf_counter() - t0 < 5


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(ModelNotAvailableError, match="config.json"):
        load_model(tmp_path)


def test_bad_dtype_string(tiny_gpt2_dir):
    with pytest.raises(ConfigError, match="dtype"):
        load_model(tiny_gpt2_dir, dtype="float33")


def test_gpt2_family_gets_offline_tokenizer_when_none_is_saved(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    assert M._needs_gpt2_tokenizer(tmp_path)
    assert M._needs_gpt2_tokenizer("gpt2-medium")
    assert not M._needs_gpt2_tokenizer("EleutherAI/pythia-70m")


# ------------------------------------------------------------------------------------------- path-like --model
@pytest.mark.parametrize("form", ["absolute", "dot", "dotdot", "tilde", "nested", "pathlib"])
def test_missing_path_says_no_such_directory(tmp_path, monkeypatch, form):
    monkeypatch.setattr(M, "_hub_reachable", lambda timeout=3.0: pytest.fail("a path must not go to the hub"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    arg = {"absolute": str(tmp_path / "no" / "model"), "dot": "./nomodel", "dotdot": "../nomodel-xyz",
           "tilde": "~/nomodel", "nested": "runs/x/model", "pathlib": tmp_path / "nomodel"}[form]
    with pytest.raises(ModelNotAvailableError, match="^no such directory: ") as e:
        load_model(arg, device="cpu")
    msg = str(e.value)
    assert "huggingface-cli" not in msg and "save_pretrained" in msg
    expected = (tmp_path / "nomodel") if form == "tilde" else None
    if expected is not None:
        assert str(expected) in msg  # ~ is expanded in the message


def test_file_given_as_model_directory(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(ModelNotAvailableError, match="no such directory: .*is a file, not a directory"):
        load_model(str(f), device="cpu")


def test_hub_style_name_still_goes_to_the_hub(monkeypatch):
    seen = []
    monkeypatch.setattr(M, "_hub_cached", lambda name: seen.append(name) or False)
    monkeypatch.setattr(M, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(ModelNotAvailableError, match=r"(?s)hub is unreachable.*No local directory 'org/name'"):
        M.resolve_model_dir("org/name")
    assert seen == ["org/name"]
    assert not M.looks_like_path("EleutherAI/pythia-70m") and not M.looks_like_path("gpt2")
    assert all(M.looks_like_path(p) for p in ("/tmp/m", "./m", "../m", "~/m", "a/b/c", ".m"))


# ------------------------------------------------------------------------------------------------- dtype
@pytest.mark.parametrize("bad", ["float33", "int8", "fp32", torch.int64, 3])
def test_dtype_is_validated_before_loading(bad, monkeypatch):
    monkeypatch.setattr(M, "resolve_model_dir", lambda *a: pytest.fail("must fail before resolving the model"))
    with pytest.raises(ConfigError, match=r"dtype .* is not supported: use one of float32, bfloat16, float16"):
        load_model("organism", dtype=bad)


def test_dtype_names():
    assert M.resolve_dtype(None) is torch.float32
    assert M.resolve_dtype("bfloat16") is torch.bfloat16 and M.resolve_dtype("torch.float16") is torch.float16
    assert M.resolve_dtype(torch.bfloat16) is torch.bfloat16


BF16_U, FP16_U = 2.0 ** -8, 2.0 ** -11  # unit roundoff (half the spacing of numbers in [1, 2))
ROUNDINGS = 4
"""Rounding stages in series that reach a logit of the 2-layer model (weights+embedding, attention, MLP,
final LayerNorm+unembedding), each adding up to ~u of the logit scale: tolerance = 4·u·max|logit|."""


@pytest.mark.parametrize("dtype,u", [("bfloat16", BF16_U), ("float16", FP16_U)])
def test_half_precision_logits_within_stated_tolerance(tiny_gpt2_dir, tiny_model, gpt2_tok, dtype, u):
    toks = torch.tensor([gpt2_tok.encode("Hello world. When the cat sat on the mat, it was happy.")])
    low = load_model(tiny_gpt2_dir, device="cpu", dtype=dtype)
    assert {p.dtype for p in low.parameters() if p.is_floating_point()} == {getattr(torch, dtype)}
    with torch.no_grad():
        ref = tiny_model(toks)
        out = low(toks).float()
    assert ref.dtype == torch.float32
    diff = (out - ref).abs().max().item()
    tol = ROUNDINGS * u * ref.abs().max().item()  # bfloat16: 0.0148 here (measured 0.0047); float16 0.0018 (0.0006)
    assert 0 < diff <= tol, (diff, tol)
    assert torch.equal(out.argmax(-1), ref.argmax(-1))


def test_planted_counter_survives_bfloat16(isolated_cache):
    """The planted counter's features (count, relayed count; up to 10) in bfloat16 are within one rounding of
    the value (u·10 = 0.039; measured 0.019). Its previous-token distractor does *not* survive (scores
    -16·(Δp)² round badly: 0.5 off), which is why float32 stays the reference."""
    from wordpos.probing.models.planted import DIM

    planted_model = load_model("planted", device="cpu")  # built into the test's own cache
    low = load_model("planted", device="cpu", dtype="bfloat16")
    toks = planted_model.to_tokens("The cat sat. When the dramatisation began, slowly.\nThen it ended and")
    name = "blocks.1.hook_resid_post"
    with torch.no_grad():
        _, ref = planted_model.run_with_cache(toks, names_filter=lambda n: n == name)
        _, out = low.run_with_cache(toks, names_filter=lambda n: n == name)
    for feature in ("count", "relay"):
        a, b = ref[name][0, :, DIM[feature]], out[name][0, :, DIM[feature]].float()
        assert a.abs().max() > 5  # the feature is there to compare
        assert (a - b).abs().max() <= BF16_U * a.abs().max()


def test_make_engine_dtype(tiny_gpt2_dir, tiny_model):
    from wordpos.probing.engines import make_engine
    from wordpos.probing.engines.base import engine_dtype

    assert engine_dtype(make_engine(str(tiny_gpt2_dir), device="cpu", dtype="bfloat16")) is torch.bfloat16
    assert engine_dtype(make_engine(str(tiny_gpt2_dir), "nnsight", device="cpu", dtype="float16")) is torch.float16
    assert engine_dtype(make_engine(tiny_model, dtype="float32")) is torch.float32  # agrees with the loaded model
    with pytest.raises(ConfigError, match="already loaded in float32"):
        make_engine(tiny_model, dtype="bfloat16")
    with pytest.raises(ConfigError, match="not supported"):
        make_engine(str(tiny_gpt2_dir), "nnsight", dtype="half")


# ------------------------------------------------------------------------------------------ wordpos models
def test_models_list_and_pull_report_damage_with_the_fix(tmp_path, monkeypatch, capsys):
    import shutil

    from wordpos.circuit.cli import main
    from wordpos.probing.models import organism as O
    from wordpos.probing.models import smollm2 as S

    monkeypatch.setenv("WORDPOS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(O, "train_organism", lambda *a, **k: pytest.fail("must not train"))
    monkeypatch.setattr(S, "pull_smollm2", lambda **k: pytest.fail("must not pull"))
    assert main(["models", "pull", "organism"]) == 0  # a whole shipped copy: nothing to do
    assert capsys.readouterr().out.strip() == f"organism: {O.ASSET_DIR}"
    bad = tmp_path / "organism"
    shutil.copytree(O.ASSET_DIR, bad)
    (bad / "config.json").write_text("{}")
    monkeypatch.setattr(O, "ASSET_DIR", bad)
    (tmp_path / "cache" / S.NAME).mkdir(parents=True)
    (tmp_path / "cache" / S.NAME / "config.json").write_text("{}")  # a partial SmolLM2 copy
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[2] for line in out.splitlines()[1:] if line.split()[0] in ("organism", S.NAME)}
    assert rows == {"organism": "DAMAGED", S.NAME: "DAMAGED"}
    assert "wordpos models pull organism --force" in out and "wordpos models pull smollm2-135m --force" in out
    assert main(["models", "pull", "nosuch"]) == 2
