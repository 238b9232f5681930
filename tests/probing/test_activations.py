from pathlib import Path

import numpy as np
import pytest
import torch

from wordpos.probing import ConfigError, DatasetConfig, WordIndexDataset, as_engine, collect_residuals


def test_matches_run_with_cache_at_word_final_tokens(tiny_model, small_data):
    acts = collect_residuals(tiny_model, small_data, layers="all", progress=False, batch_size=16)
    assert acts.layers == [0, 1]
    ps = small_data.test
    with torch.no_grad():
        _, cache = tiny_model.run_with_cache(ps.tokens[:3])
    for layer in (0, 1):
        ref = torch.cat([cache[f"blocks.{layer}.hook_resid_post"][i, ps.word_last[i]] for i in range(3)])
        assert torch.allclose(acts.test(layer)[:21], ref, atol=1e-5)
    assert np.array_equal(acts.labels["test"], ps.labels.numpy())
    assert np.array_equal(acts.abs_pos["test"][:7], ps.word_last[0].numpy())


def test_resid_pre_of_layer_zero_is_the_embedding(tiny_model, small_data):
    acts = collect_residuals(tiny_model, small_data, layers=[0], kind="resid_pre", positions="word_first",
                             splits=("test",), progress=False)
    ps = small_data.test
    with torch.no_grad():
        _, cache = tiny_model.run_with_cache(ps.tokens[:1])
    assert torch.allclose(acts.test(0)[:7], cache["blocks.0.hook_resid_pre"][0, ps.word_first[0]], atol=1e-5)


def test_spilling_to_disk_gives_identical_results(tiny_model, small_data, tmp_path):
    a = collect_residuals(tiny_model, small_data, layers=[1], progress=False)
    b = collect_residuals(tiny_model, small_data, layers=[1], progress=False, max_memory_mb=0.01, spill_dir=tmp_path)
    assert isinstance(b.data["train"], np.memmap)
    assert torch.equal(a.train(1), b.train(1))



def test_default_spill_folder_is_removed_with_the_result_or_on_failure(tiny_model, small_data, tmp_path, monkeypatch):
    """The temporary spill folder (a 4096-prompt sweep writes GBs there) goes when the last array using it does
    (the result, a copy of it, a view taken out of it), and at once when the collection fails part-way; a folder
    the caller named is left alone."""
    import gc
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # mkdtemp's default parent, for this test only
    a = collect_residuals(tiny_model, small_data, layers=[1], progress=False)
    b = collect_residuals(tiny_model, small_data, layers=[1], progress=False, max_memory_mb=0.01)
    spilled = Path(b.meta["spilled_to"])
    assert spilled.parent == tmp_path and (spilled / "resid_train.npy").is_file()
    host = b.to_host()  # a copy sharing the maps
    train = b.data["train"][:, 0]  # a view taken out of the result
    del b
    gc.collect()
    assert (spilled / "resid_train.npy").is_file() and torch.equal(host.train(1), a.train(1))
    del host
    gc.collect()
    assert not (spilled / "resid_test.npy").exists() and (spilled / "resid_train.npy").is_file()
    assert torch.equal(torch.from_numpy(np.asarray(train)), a.train(1))
    del train
    gc.collect()
    assert not spilled.exists()

    calls = {"n": 0}
    run = type(as_engine(tiny_model)).run

    def failing_run(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return run(self, *args, **kwargs)

    monkeypatch.setattr(type(as_engine(tiny_model)), "run", failing_run)
    with pytest.raises(KeyboardInterrupt):
        collect_residuals(tiny_model, small_data, layers=[1], progress=False, max_memory_mb=0.01, batch_size=8)
    assert not any(p.name.startswith("wordpos-resid-") for p in tmp_path.iterdir())
    kept = tmp_path / "mine"
    c = collect_residuals(tiny_model, small_data, layers=[1], progress=False, max_memory_mb=0.01, spill_dir=kept)
    del c
    gc.collect()
    assert (kept / "resid_train.npy").is_file()

def test_batch_size_does_not_change_results(tiny_model, small_data):
    a = collect_residuals(tiny_model, small_data, layers=[1], progress=False, batch_size=7)
    b = collect_residuals(tiny_model, small_data, layers=[1], progress=False, batch_size=64)
    assert torch.allclose(a.test(1), b.test(1), atol=1e-5)


def test_save_and_load_round_trip(tiny_model, small_data, tmp_path):
    a = collect_residuals(tiny_model, small_data, layers="all", progress=False)
    a.save(tmp_path / "r")
    b = type(a).load(tmp_path / "r")
    assert b.layers == a.layers and torch.equal(a.val(0), b.val(0))


def test_bad_layers_and_too_long_prompts(tiny_model, small_data, gpt2_tok):
    with pytest.raises(ConfigError, match="out of range"):
        collect_residuals(tiny_model, small_data, layers=[5], progress=False)
    with pytest.raises(ConfigError, match="no layers"):
        collect_residuals(tiny_model, small_data, layers=[], progress=False)
    long = WordIndexDataset.generate(gpt2_tok, DatasetConfig(n_prompts=20, n_words=30))
    with pytest.raises(ConfigError, match="context"):
        collect_residuals(tiny_model, long, progress=False)


def test_device_resident_chunks_give_identical_results(tiny_model, small_data, tmp_path, monkeypatch):
    """The accelerator path (gathered vectors kept on the device, copied to the host in chunks), forced on
    the CPU with a chunk smaller than a batch, equals the write-in-place path, spilled or not."""
    from wordpos.probing import activations

    a = collect_residuals(tiny_model, small_data, layers="all", progress=False, batch_size=8)
    monkeypatch.setattr(activations, "_device_chunk_rows", lambda device, row_bytes: 13)
    b = collect_residuals(tiny_model, small_data, layers="all", progress=False, batch_size=8)
    c = collect_residuals(tiny_model, small_data, layers="all", progress=False, batch_size=8, max_memory_mb=0.01,
                          spill_dir=tmp_path)
    for split in ("train", "val", "test"):
        assert np.array_equal(a.data[split], b.data[split]) and np.array_equal(a.data[split], c.data[split])


def test_batch_size_default_is_the_measured_cpu_size(tiny_model, small_data, monkeypatch):
    from wordpos.probing import activations
    from wordpos.probing.engines import memory

    acts = collect_residuals(tiny_model, small_data, layers=[1], splits=("test",), progress=False)
    assert acts.meta["batch_size"] == activations.CPU_BATCH
    # on an accelerator the batch comes from its free memory: fake 1 GiB free on this "device"
    monkeypatch.setattr(memory, "free_memory_bytes", lambda device: 2**30)
    rows = activations.residual_batch_size(activations.as_engine(tiny_model), small_data, 2)
    per_row = small_data.max_len() * activations._bytes_per_token(activations.as_engine(tiny_model), 2)
    assert rows == min(int(2**30 * memory.HEADROOM // per_row), activations.MAX_DEVICE_BATCH)
    with pytest.raises(ConfigError, match="batch_size"):
        collect_residuals(tiny_model, small_data, layers=[1], progress=False, batch_size=0)


def test_residuals_kept_on_the_device_equal_the_host_ones(tiny_model, small_data, tmp_path, monkeypatch):
    """The accelerator default when the residuals fit in a quarter of the free memory (forced here on the CPU):
    torch tensors that stay where they were gathered, equal to the host path; fits, save and load see the same."""
    from wordpos.probing import WordIndexProbe, activations
    from wordpos.probing.activations import Residuals

    a = collect_residuals(tiny_model, small_data, layers="all", progress=False, batch_size=8)
    monkeypatch.setattr(activations, "_device_chunk_rows", lambda device, row_bytes: 10**9)  # everything fits
    b = collect_residuals(tiny_model, small_data, layers="all", progress=False, batch_size=8)
    assert b.meta["on_device"] == "cpu" and all(isinstance(v, torch.Tensor) for v in b.data.values())
    assert b.nbytes == a.nbytes
    for split in ("train", "val", "test"):
        assert np.array_equal(a.data[split], b.data[split].numpy())
    pa = WordIndexProbe(layer=1).fit(a.train(1), a.labels["train"])
    pb = WordIndexProbe(layer=1).fit(b.train(1), b.labels["train"])
    assert np.array_equal(pa.predict(a.test(1)), pb.predict(b.test(1)))
    loaded = Residuals.load(b.save(tmp_path / "r"))
    assert np.array_equal(np.asarray(loaded.data["test"]), a.data["test"])
