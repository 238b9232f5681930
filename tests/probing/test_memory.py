"""Batch sizes from free device memory (``wordpos.probing.engines.memory``): None on the CPU, arithmetic
against hand-computed numbers on a mocked CUDA device, and the error when one row does not fit."""

from types import SimpleNamespace

import pytest
import torch

from wordpos.probing.engines import memory
from wordpos.probing.errors import ConfigError, WordposError

GiB, MiB = 2**30, 2**20


def test_cpu_gives_no_suggestion(tiny_model):
    from wordpos.probing.engines import TLEngine

    eng = TLEngine(tiny_model)
    assert eng.device.type == "cpu"
    assert memory.free_memory_bytes("cpu") is None
    assert memory.suggest_batch(eng, tokens_per_row=36, bytes_per_token=10**9) is None  # even a huge row: keep CPU sizes


@pytest.fixture
def cuda_free(monkeypatch):
    """A CUDA device whose free memory the test sets (torch.cuda.mem_get_info mocked; no GPU needed)."""
    state = {"free": 10 * GiB, "calls": []}

    def mem_get_info(device=None):
        state["calls"].append(torch.device(device))
        return state["free"], 80 * GiB

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    return state


def test_free_memory_reads_mem_get_info(cuda_free):
    assert memory.free_memory_bytes("cuda:1") == 10 * GiB
    assert cuda_free["calls"] == [torch.device("cuda:1")]


def test_suggest_batch_arithmetic(cuda_free):
    eng = SimpleNamespace(device=torch.device("cuda:0"))
    # 10 GiB free, 80% usable = 8 GiB = 8589934592 bytes; a row = 36 tokens x 1 MiB = 37748736 bytes
    # -> floor(8589934592 / 37748736) = floor(227.55...) = 227 rows
    assert memory.suggest_batch(eng, 36, MiB) == 227
    assert memory.suggest_batch(eng, 36, MiB, headroom=0.5) == 142  # 5 GiB / 36 MiB = 142.2
    assert memory.suggest_batch(eng, 36, MiB, max_batch=64) == 64
    cuda_free["free"] = 45 * MiB  # 36 MiB usable: exactly one row
    assert memory.suggest_batch(eng, 36, MiB) == 1


def test_one_row_that_does_not_fit_names_the_setting(cuda_free):
    eng = SimpleNamespace(device=torch.device("cuda:0"))
    cuda_free["free"] = 44 * MiB  # 35.2 MiB usable < 36 MiB
    with pytest.raises(ConfigError, match=r"(?s)one row does not fit on cuda:0.*36\.0 MiB.*44\.0 MiB.*Lower --n-words"):
        memory.suggest_batch(eng, 36, MiB, setting="--n-words")
    with pytest.raises(WordposError, match="--dtype"):  # the default names the prompt length and the dtype
        memory.suggest_batch(eng, 36, MiB)


@pytest.mark.parametrize("kwargs", [dict(tokens_per_row=0, bytes_per_token=1), dict(tokens_per_row=3, bytes_per_token=0),
                                    dict(tokens_per_row=3, bytes_per_token=1, headroom=1.5),
                                    dict(tokens_per_row=3, bytes_per_token=1, max_batch=0)])
def test_bad_arguments(kwargs):
    with pytest.raises(ConfigError):
        memory.suggest_batch(SimpleNamespace(device=torch.device("cpu")), **kwargs)
