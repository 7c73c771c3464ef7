from pathlib import Path

from study.protocol import plan, schema as protocol

D2L = Path(__file__).resolve().parents[1] / "protocols" / "d2l-dropout.yaml"
# The d2l protocol as it ran before it became portable: its keys are pinned below, as old stores
# hold them (the portable study's own keys are new cells, pinned in test_portable_keys_are_new).
CLASSIC = ["determinism=[default]", "threads=null"]


def _d2l(*overrides: str) -> protocol.Protocol:
    return protocol.load(D2L, [*CLASSIC, *overrides])


def test_expansion_covers_every_combination():
    proto = protocol.load(D2L, ["seeds.count=3", "devices=[cpu, cuda]",
                                "determinism=[default, strict]", "implementations=[torch, scratch]",
                                "replicates=2"])
    cells = plan.expand(proto)
    assert len(cells) == 6 * 3 * 2 * 2 * 2 * 2
    combos = {(c.dropout1, c.dropout2, c.seed, c.device, c.determinism, c.implementation,
               c.replicate) for c in cells}
    assert len(combos) == len(cells)
    assert len({c.key for c in cells}) == len(cells)


def test_first_seed_of_every_setting_comes_first():
    cells = plan.expand(protocol.load(D2L))
    assert [c.seed for c in cells[:6]] == [0] * 6
    assert {(c.dropout1, c.dropout2) for c in cells[:6]} == set(protocol.load(D2L).dropout)


def test_keys_are_stable_and_track_what_defines_a_run():
    keys = [c.key for c in plan.expand(_d2l())]
    assert keys == [c.key for c in plan.expand(_d2l())]
    # Pinned: a key that silently changed would make every store re-run its whole study.
    # (With the protocol's 25 inference passes; without them, see the test below.)
    assert keys[0] == "a6be97688f40bfb4"
    # Native masks: the key these cells had before SFC64 masks entered the key (old stores).
    assert plan.expand(_d2l(*["randomness=native", "execution=sequential",
                                           "inference.mc_passes=0"]))[0].key == "8917af3013e2a368"
    other_epochs = [c.key for c in plan.expand(_d2l(*["training.epochs=3"]))]
    assert not set(keys) & set(other_epochs)
    wider_batches = [c.key for c in plan.expand(_d2l(*["batch_members=7"]))]
    assert keys == wider_batches  # how cells are grouped for speed is not what they are
    renamed = [c.key for c in plan.expand(_d2l(*["description=other"]))]
    assert keys == renamed


def test_passes_enter_the_key_only_when_asked_for():
    # Pinned before `inference` existed: without passes, keys (and stores) stay as they were.
    off = plan.expand(_d2l(*["inference.mc_passes=0"]))
    assert (off[0].key, off[1].key) == ("653cea852cdd5e4b", "5dc4690eda47c54c")
    assert "mc_passes" not in off[0].labels()
    on = plan.expand(_d2l(*["inference.mc_passes=8"]))
    more = plan.expand(_d2l(*["inference.mc_passes=16"]))
    assert len({c.key for c in off + on + more}) == 3 * len(off)
    assert on[0].labels()["mc_passes"] == 8


def test_run_names_are_readable():
    cell = plan.expand(_d2l())[1]
    assert cell.name == "p0.2-0.5 seed0 cpu default torch"


def test_portable_keys_are_new():
    # The shipped study runs portable on OpenBLAS: new cells, never mistaken for the default ones.
    portable = [c.key for c in plan.expand(protocol.load(D2L))]
    assert {c.kernels for c in plan.expand(protocol.load(D2L))} == {"openblas-haswell"}
    assert not set(portable) & {c.key for c in plan.expand(_d2l())}
    assert plan.expand(protocol.load(D2L))[1].name == "p0.2-0.5 seed0 cpu portable torch t2"


def test_a_thread_list_is_an_axis_and_keeps_single_count_keys():
    one = {c.key: c for c in plan.expand(protocol.load(D2L, ["seeds.count=1", "threads=1"]))}
    both = plan.expand(protocol.load(D2L, ["seeds.count=1", "threads=[1, 2]"]))
    assert len(both) == 2 * len(one) and len({c.key for c in both}) == len(both)
    assert {c.config.threads for c in both} == {1, 2}
    # A cell at 1 thread is the same cell whether 1 was the only count or one of a list.
    assert {c.key for c in both if c.config.threads == 1} == set(one)
    assert all(c.name.endswith(" t1") for c in one.values())


def test_the_kernel_path_enters_the_key_only_where_it_runs_and_is_new():
    def cells(*overrides: str) -> list[plan.Cell]:
        return plan.expand(_d2l("seeds.count=1", "threads=1", *overrides))

    default = cells()
    # Default mode ignores the knob: its keys (and every store of it) stay as they were.
    assert [c.key for c in cells("kernels=torch")] == [c.key for c in default]
    assert {c.kernels for c in default} == {"torch"}
    old = cells("determinism=[portable]", "kernels=torch")
    new = cells("determinism=[portable]")
    assert {c.kernels for c in new} == {"openblas-haswell"}
    assert new[0].labels()["kernels"] == "openblas-haswell"
    # New portable runs are never taken for old ones; the old keys themselves are pinned by
    # tests/golden/portable.json (test_golden: its cells keep their keys with kernels: torch).
    assert not {c.key for c in old} & {c.key for c in new}
    # CUDA has its own kernels: the knob does not reach it.
    assert {c.kernels for c in cells("determinism=[portable]", "devices=[cuda]")} == {"torch"}

