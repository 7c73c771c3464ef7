"""What decides the bits, as recorded: ISA from the CPU flags, and the differences verify names."""

import pytest

from study.engine import environment


@pytest.mark.parametrize("flags, isa", [("fpu sse4_2 avx avx2 fma avx512f avx512bw", "avx512"),
                                        ("fpu sse4_2 avx avx2 fma", "avx2"),
                                        ("fpu sse2 sse4_2", "sse4.2")])
def test_cpu_isa_is_the_widest_flag_reported(monkeypatch, flags, isa):
    monkeypatch.setattr(environment, "_cpuinfo", lambda: {"flags": flags})
    environment.cpu_isa.cache_clear()
    try:
        assert environment.cpu_isa() == isa
    finally:
        environment.cpu_isa.cache_clear()


def test_arm_features_read_as_neon(monkeypatch):
    monkeypatch.setattr(environment, "_cpuinfo", lambda: {"Features": "fp asimd evtstrm"})
    environment.cpu_isa.cache_clear()
    try:
        assert environment.cpu_isa() == "neon"
    finally:
        environment.cpu_isa.cache_clear()


def test_differences_name_each_key_recorded_and_present():
    recorded = {"cpu_isa": "avx512", "mkl_cbwr": "COMPATIBLE", "torch_version": "2.14.1"}
    present = {"cpu_isa": "avx2", "mkl_cbwr": "COMPATIBLE", "blas": "BLAS=mkl"}
    assert environment.differences(recorded, present) == [
        "torch_version: 2.14.1 -> absent", "cpu_isa: avx512 -> avx2", "blas: absent -> BLAS=mkl"]
    assert environment.differences(present, present) == []


def test_this_process_reports_its_arithmetic():
    env = environment.arithmetic("cpu")
    assert set(environment.BITS_KEYS) - {"torch_version", "machine"} <= set(env)
    assert env["threads.intra_op"].isdigit() and env["blas"].startswith("BLAS=")
