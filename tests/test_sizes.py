"""The training-set size as an axis of the plan: expansion, keys, per-size budgets, evaluation
every K epochs (sequential and batched), and workers that group by size."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest

from study.engine import batched, data, workers
from study.protocol import plan, schema as protocol
from study.engine.train import train

PROTOCOLS = Path(__file__).resolve().parents[1] / "protocols"

# Cell keys of every shipped protocol, computed at commit f3dac09, before the size axis existed:
# (file, cells, sha256 of the keys joined in plan order, first 16 hex). overfitting.yaml is left
# out: it was rewritten with the axis. (d2l-dropout's keys changed once before, at its
# `inference.mc_passes`; the others equal those of commit 2a064c8.)
KEYS_BEFORE_SIZE_AXIS = [
    ("d2l-dropout.yaml", 60, "6c0806358a428e09"),
    ("determinism-lenet.yaml", 24, "376c7caddfe72073"),
    ("determinism.yaml", 72, "9694e6185f174ea0"),
    ("implementations.yaml", 60, "8102534cadb5b2b0"),
    ("portability.yaml", 48, "5634de85411d01c1"),  # portable cells: kernels openblas-haswell
    ("smoke.yaml", 9, "fcf8c1b404799945"),
    ("variance-sources.yaml", 50, "737c81b06db6e190"),
]


def _keys_digest(cells: list[plan.Cell]) -> str:
    import hashlib
    return hashlib.sha256("".join(c.key for c in cells).encode()).hexdigest()[:16]


# d2l-dropout now runs portable (new cells); its keys as they were are those of its default form.
AS_BEFORE = {"d2l-dropout.yaml": ["determinism=[default]", "threads=null"]}


@pytest.mark.parametrize("file,n,digest", KEYS_BEFORE_SIZE_AXIS)
def test_protocols_with_one_size_keep_their_keys(file, n, digest):
    cells = plan.expand(protocol.load(PROTOCOLS / file, AS_BEFORE.get(file, [])))
    assert len(cells) == n and _keys_digest(cells) == digest


def _sized(*overrides: str) -> protocol.Protocol:
    return protocol.load(PROTOCOLS / "smoke.yaml", ["seeds.count=2", *overrides])


def test_a_size_list_is_an_axis_and_a_listed_size_keeps_its_single_size_key():
    alone = {c.key for c in plan.expand(_sized("data.train_subset=1000"))}
    both = plan.expand(_sized("data.train_subset=[1000, null]"))
    assert len(both) == 2 * len(alone) and len({c.key for c in both}) == len(both)
    assert {c.key for c in both if c.config.data.train_subset == 1000} == alone
    assert {c.train_images for c in both} == {1000, 60_000}
    assert {c.labels()["train_images"] for c in both} == {1000, 60_000}
    assert all(c.name.endswith(" n1000") for c in both if c.config.data.train_subset == 1000)
    # Sizes first, in the file's order: one size's cells are contiguous and go to one worker.
    sizes = [c.config.data.train_subset for c in both]
    assert sizes == [1000] * len(alone) + [None] * len(alone)


def test_each_size_trains_with_its_own_budget():
    proto = _sized("data.train_subset=[1000, 3000, null]", "training.epochs=4",
                   "training.by_size=[{train_subset: 1000, epochs: 40, eval_every: 10}, "
                   "{train_subset: 3000, epochs: 12}]")
    budget = {c.config.data.train_subset: (c.config.training.epochs, c.config.training.eval_every,
                                           c.config.training.lr) for c in plan.expand(proto)}
    assert budget == {1000: (40, 10, 0.5), 3000: (12, 1, 0.5), None: (4, 1, 0.5)}
    slower = _sized("data.train_subset=[1000, null]",
                    "training.by_size=[{train_subset: 1000, epochs: 40, lr: 0.2}]")
    lrs = {c.config.data.train_subset: c.config.training.lr for c in plan.expand(slower)}
    assert lrs == {1000: 0.2, None: 0.5}
    # A size's own lr changes that size's keys only.
    same = {c.key for c in plan.expand(_sized("data.train_subset=[1000, null]"))
            if c.config.data.train_subset is None}
    assert same == {c.key for c in plan.expand(slower) if c.config.data.train_subset is None}
    assert all(c.config.training.by_size == () for c in plan.expand(proto))


def test_budget_enters_the_key_only_when_it_changes_the_run():
    base = {c.key for c in plan.expand(_sized())}
    assert {c.key for c in plan.expand(_sized("training.eval_every=1"))} == base
    assert not base & {c.key for c in plan.expand(_sized("training.eval_every=2"))}


def test_evaluated_epochs_are_every_kth_and_the_last():
    spec = protocol.Training(epochs=7, eval_every=3)
    assert [e for e in range(1, 8) if spec.evaluated(e)] == [3, 6, 7]
    assert all(protocol.Training(epochs=3).evaluated(e) for e in (1, 2, 3))


@pytest.mark.parametrize("override,expected", [
    ("training.by_size=[{train_subset: 500, epochs: 3}]",
     "training.by_size: train_subset 500 is not one of data.train_subset [1000, null]"),
    ("training.by_size=[{train_subset: 1000, epochs: 3}, {train_subset: 1000, epochs: 4}]",
     "training.by_size: a train_subset given twice (value: [1000, 1000])"),
    ("training.by_size=[{train_subset: 1000, epochs: 0}]", "training.by_size.0.epochs"),
    ("training.by_size=[{train_subset: 1000, epoch: 3}]", "did you mean 'epochs'"),
    ("training.eval_every=0", "training.eval_every: Input should be greater than 0 (value: 0)"),
])
def test_bad_budgets_are_one_line_errors_naming_key_and_value(override, expected):
    with pytest.raises(protocol.ProtocolError) as err:
        protocol.load(PROTOCOLS / "smoke.yaml", ["data.train_subset=[1000, null]", override])
    lines = str(err.value).splitlines()  # one line per problem: a misspelt key is two
    assert all(line.startswith(f"{PROTOCOLS / 'smoke.yaml'}: ") for line in lines)
    assert any(expected in line for line in lines), lines


@pytest.mark.parametrize("value,expected", [
    ("[]", "data.train_subset: must not be empty (value: [])"),
    ("[1000, 1000]", "data.train_subset: must not repeat entries (value: [1000, 1000])"),
    ("[1000, 70000]", "data.train_subset: 70000 exceeds the 60000 training images"),
    ("[1000, 0]", "data.train_subset.1: Input should be greater than 0 (value: 0)"),
])
def test_bad_size_lists_are_one_line_errors(value, expected):
    with pytest.raises(protocol.ProtocolError) as err:
        protocol.load(PROTOCOLS / "smoke.yaml", [f"data.train_subset={value}"])
    (line,) = str(err.value).splitlines()
    assert expected in line, line


def _tiny_cells(execution: str) -> list[plan.Cell]:
    proto = _sized(f"execution={execution}", "randomness=portable", "data.train_subset=[300, 600]",
                   "training.by_size=[{train_subset: 300, epochs: 5, eval_every: 2}]",
                   "training.epochs=2", "training.batch_size=100", "dropout=[[0, 0], [0.5, 0.5]]",
                   "baseline=[0, 0]")
    return plan.expand(proto)


def _evaluated(epochs) -> list[int]:
    return [e.epoch for e in epochs if not math.isnan(e.test_acc)]


@pytest.mark.parametrize("execution", ["sequential", "batched"])
def test_test_set_is_evaluated_only_on_its_epochs(tiny_data, execution):
    cells = [c for c in _tiny_cells(execution) if c.config.data.train_subset == 300]
    subset = tiny_data.subset(300)
    results = [train(c, subset) for c in cells] if execution == "sequential" else \
        list(batched.train_many(cells, subset))
    for r in results:
        assert len(r.epochs) == 5 and _evaluated(r.epochs) == [2, 4, 5]
        assert all(math.isfinite(e.train_acc) for e in r.epochs) and r.status != "diverged"


def test_batched_and_sequential_agree_on_every_evaluated_epoch(tiny_data):
    cell = next(c for c in _tiny_cells("batched") if c.config.data.train_subset == 300)
    (alone,) = [train(cell, tiny_data.subset(300))]
    (together,) = list(batched.train_many([cell], tiny_data.subset(300)))
    assert _evaluated(alone.epochs) == _evaluated(together.epochs)
    for a, b in zip(alone.epochs, together.epochs):
        assert (math.isnan(a.test_acc) and math.isnan(b.test_acc)) or \
            abs(a.test_acc - b.test_acc) <= 0.02


def test_workers_give_each_size_its_own_group_and_subset(tiny_files, tmp_path):
    folder, checksums = tiny_files
    load = functools.partial(data.load, folder, cache=tmp_path, checksums=checksums)
    cells = _tiny_cells("batched")
    groups = workers.groups(list(reversed(cells)), load)
    assert [g.train_subset for g in groups] == [300, 600]  # smaller first
    assert all({c.config.data.train_subset for c in g.cells} == {g.train_subset} for g in groups)
    assert groups[0].name.endswith("/n=300")
    chunks = list(batched.members(cells))
    assert all(len({(c.config.data, c.config.training) for c in chunk}) == 1 for chunk in chunks)
