import os

import pytest
import torch

from study.engine import seeding


def _draws(seed: int) -> list[float]:
    gen = seeding.generator(seed)
    return torch.rand(5, generator=gen).tolist()


def test_same_seed_same_streams_other_seed_other_streams():
    assert seeding.stream_seeds(3) == seeding.stream_seeds(3)
    assert seeding.stream_seeds(3) != seeding.stream_seeds(4)
    a, b = seeding.stream_seeds(3), seeding.stream_seeds(4)
    assert _draws(a.init) == _draws(seeding.stream_seeds(3).init)
    assert _draws(a.init) != _draws(b.init)


def test_streams_of_one_seed_are_distinct():
    s = seeding.stream_seeds(0)
    assert len({s.init, s.data, s.dropout}) == 3
    assert all(0 <= v < 2**63 for v in (s.init, s.data, s.dropout))


@pytest.mark.parametrize("vary", ["init", "data", "dropout"])
def test_varying_one_source_holds_the_others_fixed(vary):
    a = seeding.stream_seeds(5, vary, fixed=0)
    b = seeding.stream_seeds(6, vary, fixed=0)
    for stream in seeding.STREAMS:
        same = getattr(a, stream) == getattr(b, stream)
        assert same == (stream != vary), stream
    # The fixed streams are those of the fixed seed.
    base = seeding.stream_seeds(0)
    assert all(getattr(a, s) == getattr(base, s) for s in seeding.STREAMS if s != vary)


def test_derivation_does_not_touch_global_state():
    before = torch.random.get_rng_state()
    seeding.stream_seeds(11)
    seeding.generator(11)
    assert torch.equal(before, torch.random.get_rng_state())


def test_global_dropout_rng_is_seeded_then_restored():
    before = torch.random.get_rng_state()
    with seeding.global_dropout_rng(42, "cpu"):
        inside = torch.rand(3)
    with seeding.global_dropout_rng(42, "cpu"):
        again = torch.rand(3)
    assert torch.equal(inside, again)
    assert torch.equal(before, torch.random.get_rng_state())


def test_strict_mode_applies_reports_and_restores():
    before = seeding.current_flags()
    with seeding.determinism("strict") as flags:
        assert flags == seeding.MODES["strict"]
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert not torch.backends.cudnn.benchmark
    assert seeding.current_flags() == before


def test_benchmark_mode_turns_cudnn_benchmark_on_only():
    with seeding.determinism("benchmark") as flags:
        assert flags.cudnn_benchmark and not flags.deterministic_algorithms
    with seeding.determinism("default") as flags:
        assert flags == seeding.MODES["default"]


def test_threads_are_applied_and_restored():
    before = torch.get_num_threads()
    with seeding.threads(1) as n:
        assert n == 1 == torch.get_num_threads()
    assert torch.get_num_threads() == before


def test_a_mode_owns_its_process_environment():
    default, strict = seeding.process_env("default", None), seeding.process_env("strict", 2)
    # None means unset: default clears an MKL_CBWR left in the shell, so its flag is true.
    assert default["MKL_CBWR"] is None and "OMP_NUM_THREADS" not in default
    assert strict["MKL_CBWR"] == "AUTO" and strict["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert strict["OMP_NUM_THREADS"] == strict["MKL_NUM_THREADS"] == "2"
    portable = seeding.process_env("portable", 1)
    assert (portable["MKL_CBWR"], portable["ATEN_CPU_CAPABILITY"],
            portable["ONEDNN_MAX_CPU_ISA"]) == ("COMPATIBLE", "avx2", "AVX2")
    # OpenBLAS pinned to its Haswell kernels, one thread per product whatever the count.
    assert (portable["OPENBLAS_CORETYPE"], portable["OPENBLAS_NUM_THREADS"]) == ("Haswell", "1")
    assert seeding.process_env("portable", 2)["OPENBLAS_NUM_THREADS"] == "1"
    assert default["OPENBLAS_CORETYPE"] is None and strict["OPENBLAS_NUM_THREADS"] is None
    assert seeding.MODES["portable"] == seeding.MODES["strict"]
