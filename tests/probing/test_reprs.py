"""The short reprs' building blocks: sizes and dtypes read off the object, long lists clipped with a count."""
import numpy as np
import torch

from wordpos.probing.reprs import array_summary, clipped, percent


def test_array_summary_names_dtype_shape_and_a_non_cpu_place(tmp_path):
    assert array_summary(torch.zeros(3, 4, dtype=torch.bfloat16)) == "bfloat16[3×4]"
    assert array_summary(np.zeros((2, 0, 5), dtype=np.float32)) == "float32[2×0×5]"
    assert array_summary(torch.tensor(1.0)) == "float32[]"
    mm = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float16, shape=(7, 2))
    assert array_summary(mm) == "float16[7×2] memmap"
    assert array_summary(torch.zeros(2, device="meta")) == "float32[2] meta"
    assert array_summary([1, 2]) == "list"


def test_clipped_keeps_the_first_items_and_counts_the_rest():
    assert clipped(range(3)) == "0, 1, 2"
    assert clipped(range(10), 4) == "0, 1, 2, 3, … (+6 more)"
    assert clipped([], 2) == ""


def test_percent():
    assert percent(0.9621848739495799) == "96.2%"
    assert percent(None) == "n/a" and percent(float("nan")) == "n/a"
