"""The bench on a tiny configuration: every number is there and positive; no speed claims."""

import json

import pytest

from study import bench, data
from tests.conftest import make_idx_dir

DIMS = [784, 256, 256, 10]


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    folder = tmp_path_factory.mktemp("idx")
    checksums = make_idx_dir(folder, n_train=512, n_test=100)
    cache = tmp_path_factory.mktemp("cache")
    return cache, data.load(folder, cache=cache, checksums=checksums)


def test_gemm_shapes_count_the_epochs_flops_by_hand():
    shapes = bench.gemm_shapes(n_train=600, n_test=100, batch=256, dims=DIMS)
    flops = sum(2 * m * k * n * count for m, k, n, count, _ in shapes)
    weights = 784 * 256 + 256 * 256 + 256 * 10
    # Per example: forward + weight gradients (2 x weights), input gradients of layers 2 and 3.
    per_example = 2 * (2 * weights + 256 * 256 + 256 * 10)
    assert flops == 600 * per_example + 100 * 2 * weights


def test_bench_reports_every_number(tiny_root, tmp_path):
    root, tiny = tiny_root
    result = bench.measure(epochs=1, members=3, root=root, data=tiny, workers=0)
    assert result.members == 3 and result.epochs == 1
    out = bench.report(result)
    for key in ("textbook_s", "sequential_s", "batched_s", "floor_s", "gemm_gflops",
                "flops_per_epoch", "batched_masks_s"):
        assert out["seconds_per_epoch"][key] > 0, key
    assert set(out["ratios"]) == {"textbook_over_sequential", "textbook_over_batched",
                                  "sequential_over_floor", "batched_over_floor",
                                  "sequential_over_batched"}
    assert all(r > 0 for r in out["ratios"].values())
    assert {"cpu", "cores", "torch", "threads", "load_average"} <= set(out["machine"])
    assert json.loads(json.dumps(out)) == out
    assert "per member-epoch" in bench.show(result)


def test_twin_gaps_are_small_for_identical_randomness(tiny_root):
    _, tiny = tiny_root
    cells = bench.cells_of(bench.PROTOCOL, epochs=1)[:2]
    gaps = bench.twin_gaps(cells, tiny)
    assert [g.cell for g in gaps] == [c.name for c in cells]
    assert all(g.max_abs_weight < 1e-4 for g in gaps)
    assert "max |dweight|" in bench.show_gaps(gaps)
