"""The bench on a tiny configuration: every number is there and positive; no speed claims."""

import json

import pytest

from study.tools import bench, mode_cost
from study.engine import data, environment
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


def test_epoch_gemms_hold_the_counted_flops():
    gemms = bench.EpochGemms.of(n_train=600, n_test=100, batch=256, dims=DIMS)
    shapes = bench.gemm_shapes(n_train=600, n_test=100, batch=256, dims=DIMS)
    assert gemms.flops == sum(2 * m * k * n * count for m, k, n, count, _ in shapes)
    assert sum(count for *_, count in gemms.ops) == sum(s[3] for s in shapes)
    assert gemms.replay() > 0 and gemms.peak(calls=2) > 0


def test_ratios_pair_the_rounds_and_take_the_best_of_each():
    def timing(*s):
        return bench.Timing(s)
    # Rounds 2 and 3 ran on a machine twice as slow: within a round the ratios see through it;
    # the best of each pairs the batched runner's best round with the floor's.
    b = bench.Bench(textbook=timing(9.0, 10.0, 11.0), sequential=timing(1.0, 2.0, 2.1),
                    batched=timing(0.7, 1.2, 1.25), floor=timing(0.5, 1.0, 1.0),
                    peak=timing(0.4, 0.8, 0.8), flops_per_epoch=1e9, batched_masks_s=0.01,
                    members=4, epochs=1)
    assert b.ratios()["batched_over_floor"] == pytest.approx(0.7 / 0.5)
    assert b.ratios()["textbook_over_batched"] == pytest.approx(9.0 / 0.7)
    assert b.ratios()["batched_over_peak"] == pytest.approx(0.7 / 0.4)
    assert b.paired()["batched_over_floor"].samples == pytest.approx((1.4, 1.2, 1.25))
    assert b.paired()["batched_over_floor"].median == pytest.approx(1.25)
    assert b.paired()["sequential_over_floor"].median == pytest.approx(2.0)
    assert "textbook_over_batched" not in b.paired()
    assert b.gemm_gflops == pytest.approx(2.0)
    assert bench.targets_met(b.ratios()) == {"batched_over_floor": False,
                                             "sequential_over_floor": True,
                                             "speedup_over_textbook": True}
    paired = {k: t.median for k, t in b.paired().items()}
    assert bench.targets_met(paired) == {"batched_over_floor": True,
                                         "sequential_over_floor": True}


def test_bench_reports_every_number(tiny_root, tmp_path):
    root, tiny = tiny_root
    result = bench.measure(epochs=1, members=3, root=root, data=tiny, workers=0, repeats=2)
    assert result.members == 3 and result.epochs == 1
    out = bench.report(result)
    for key in ("textbook_s", "sequential_s", "batched_s", "floor_s", "peak_s", "gemm_gflops",
                "flops_per_epoch", "batched_masks_s"):
        assert out["seconds_per_epoch"][key] > 0, key
    assert set(out["ratios"]) == set(bench.RATIOS)
    assert all(r > 0 for r in out["ratios"].values())
    assert set(out["paired_ratios"]) == set(bench.RATIOS) - {"textbook_over_sequential",
                                                             "textbook_over_batched"}
    assert all(len(p["rounds"]) == 2 for p in out["paired_ratios"].values())
    assert set(out["targets_met"]["best"]) == {"batched_over_floor", "sequential_over_floor",
                                               "speedup_over_textbook"}
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


def test_mode_costs_divide_by_default_of_the_same_engine_best_and_within_rounds():
    timings = {("sequential", "default"): bench.Timing((1.0, 2.0, 1.5)),
               ("sequential", "portable"): bench.Timing((2.5, 3.0, 3.3)),
               ("sequential", "strict"): bench.Timing((1.0, 2.2, 1.5)),
               ("batched", "default"): bench.Timing((0.5, 0.5, 0.5)),
               ("batched", "portable"): bench.Timing((0.6, 0.7, 0.5))}
    costs = {(c.engine, c.variant): c for c in bench.mode_costs(timings)}
    assert set(costs) == {("sequential", "portable"), ("sequential", "strict"),
                          ("batched", "portable")}
    assert costs["sequential", "portable"].best == 2.5  # 2.5 / 1.0
    assert costs["sequential", "portable"].paired_median == pytest.approx(2.2)  # of 2.5, 1.5, 2.2
    assert costs["sequential", "strict"].paired_median == 1.0
    assert costs["batched", "portable"].paired_median == pytest.approx(1.2)  # of 1.2, 1.4, 1.0
    assert costs["batched", "portable"].to_json()["default_seconds_per_epoch"] == [0.5] * 3
    assert "batched    portable/default" in bench.show_costs(list(costs.values()), 10_000, 3)


def test_the_costs_file_holds_what_the_bench_measured_and_plan_reads_it(tmp_path):
    timings = {("batched", "default"): bench.Timing((0.5, 0.4)),
               ("batched", "portable"): bench.Timing((0.6, 0.5)),
               ("sequential", "default"): bench.Timing((1.0, 1.0)),
               ("sequential", "portable[torch]"): bench.Timing((2.0, 2.5))}
    path = tmp_path / "mode-costs.json"
    bench.write_costs(path, bench.mode_costs(timings), ["--modes-only", "--mode-rounds", "2"])
    raw = json.loads(path.read_text())
    assert raw["command"] == "python -m study.tools.bench --modes-only --mode-rounds 2"
    assert raw["date"][:2] == "20"
    # The file names the CPU as the runs' tags do; `study plan` reads this machine's without torch.
    assert raw["machine"]["cpu_model"] == environment.cpu_model() == mode_cost.this_cpu()
    measured = mode_cost.read(path)
    # Median of the per-round ratios (1.2, 1.25), and (2.0, 2.5): the bench's headline figure.
    assert measured.ratios == {("batched", "portable"): pytest.approx(1.225),
                               ("sequential", "portable[torch]"): pytest.approx(2.25)}
    line = mode_cost.line("portable", "batched", "openblas-haswell", measured, measured.cpu)
    assert line == (f"mode portable (batched): 1.23x default's CPU time (make bench, "
                    f"{raw['date']}, {measured.cpu})")


def test_pass_cost_is_the_share_added_to_a_runs_epochs():
    timings = {"member_epoch": bench.Timing((2.0, 1.8, 2.2)),
               "passes": bench.Timing((1.5, 1.8, 1.1))}
    cost = bench.pass_cost(timings, passes=25, epochs=10)
    assert cost["added_share_best"] == pytest.approx(1.1 / 18)  # best passes / (10 x best epoch)
    # Per round: 1.5/20, 1.8/18, 1.1/22 -> median 0.075.
    assert cost["added_share_paired_median"] == pytest.approx(0.075)


def test_time_passes_times_an_epoch_and_its_passes(tiny_root):
    _, tiny = tiny_root
    cell = bench.cells_of(bench.PROTOCOL, epochs=3)[1]
    assert cell.config.mc_passes == 0  # the runners' timings are training only
    timings = bench.time_passes(cell, tiny, passes=3, rounds=2)
    assert all(len(t.samples) == 2 and min(t.samples) > 0 for t in timings.values())
