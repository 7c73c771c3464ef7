"""Dropout left on at inference (C7): the per-run numbers against hand-worked values and brute
force, repeatability, pairing, and the batched members' passes against their twins'."""

import itertools
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from study.engine import batched, inference
from study.protocol import plan, schema as protocol
from study.engine.train import fit, seeds_of, train

BASE = dict(name="mc", dropout=[[0.0, 0.0], [0.2, 0.5], [0.5, 0.5], [1.0, 1.0]],
            seeds={"count": 1}, baseline=[0.2, 0.5], randomness="portable",
            training={"epochs": 1, "batch_size": 64, "lr": 0.05}, inference={"mc_passes": 5})


def cells(**overrides) -> list[plan.Cell]:
    return plan.expand(protocol.parse({**BASE, **overrides}))


# --- the numbers, by hand and by brute force ---------------------------------------------------


def test_flip_rate_from_counts_matches_hand_worked_values():
    # T = 3: classes (a, a, b) -> pairs (aa, ab, ab): 2 of 3 disagree; (a, b, c) -> 3 of 3.
    counts = np.array([[2, 1, 0], [1, 1, 1], [3, 0, 0]])
    assert inference.pair_flip_rates(counts) == pytest.approx([2 / 3, 1.0, 0.0])
    assert list(inference.unstable(counts)) == [True, True, False]
    assert inference.flip_example(counts) == 1
    assert inference.flip_example(np.array([[3, 0], [0, 3]])) is None


def test_flip_rate_matches_a_loop_over_pass_pairs():
    rng = np.random.default_rng(3)
    preds = rng.integers(0, 4, size=(50, 7))  # [images, passes]
    counts = np.stack([np.bincount(row, minlength=4) for row in preds])
    brute = [np.mean([a != b for a, b in itertools.combinations(row, 2)]) for row in preds]
    assert inference.pair_flip_rates(counts) == pytest.approx(brute, abs=1e-12)
    assert list(inference.unstable(counts)) == [len(set(row)) > 1 for row in preds]


def test_one_pass_has_nothing_to_flip_against():
    with pytest.raises(ValueError, match="at least 2 passes"):
        inference.pair_flip_rates(np.array([[1, 0]]))


def test_nll_and_ece_match_hand_worked_values():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.55, 0.45]])
    labels = np.array([0, 1, 1, 0])
    assert inference.nll(probs, labels) == pytest.approx(
        -(math.log(0.9) + math.log(0.4) + math.log(0.7) + math.log(0.55)) / 4)
    # 15 bins of width 1/15: conf 0.9 -> bin 13 (correct); 0.6 -> bin 8 (wrong); 0.7 -> bin 10
    # (correct); 0.55 -> bin 8 (correct). Bin 8: acc 1/2, conf 0.575; others |1 - conf|.
    hand = (2 / 4) * abs(0.5 - 0.575) + (1 / 4) * 0.1 + (1 / 4) * 0.3
    assert inference.ece(probs, labels) == pytest.approx(hand)
    # A confidence on a bin edge (0.6 = 9/15) falls in the bin it closes, (8/15, 9/15].
    assert inference.ece(np.array([[0.6, 0.4]]), np.array([0])) == pytest.approx(0.4)


def test_ece_matches_a_loop_over_bins():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(400, 10)) * 3
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = rng.integers(0, 10, 400)
    conf, correct = probs.max(1), probs.argmax(1) == labels
    brute = 0.0
    for k in range(15):
        lo, hi = k / 15, (k + 1) / 15
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            brute += inside.mean() * abs(correct[inside].mean() - conf[inside].mean())
    assert inference.ece(probs, labels) == pytest.approx(brute, abs=1e-12)


def test_an_underflowed_probability_gives_a_finite_nll():
    assert math.isfinite(inference.nll(np.array([[1.0, 0.0]]), np.array([1])))


# --- the passes ------------------------------------------------------------------------------------


def test_same_seed_same_numbers_other_seed_other_numbers(tiny_data):
    cell = cells()[1]
    first, again = train(cell, tiny_data).inference, train(cell, tiny_data).inference
    assert replace(first, seconds=0) == replace(again, seconds=0)
    other = replace(cell, seed=1)
    assert train(other, tiny_data).inference.flip_rate != first.flip_rate


def test_passes_leave_training_untouched(tiny_data):
    with_passes = cells()[1]
    without = replace(with_passes, config=replace(with_passes.config, mc_passes=0))
    a, b = train(with_passes, tiny_data), train(without, tiny_data)
    assert a.weights_sha256 == b.weights_sha256 and a.epochs == b.epochs
    assert b.inference is None and a.inference.passes == 5
    assert a.inference.eval.accuracy == pytest.approx(a.epochs[-1].test_acc, abs=1e-12)


def test_the_masks_come_from_the_inference_stream(tiny_data):
    cell = cells()[1]
    net, result = fit(cell, tiny_data)
    seeds = seeds_of(cell)
    moved = inference.mc_passes(cell, net, tiny_data, replace(seeds, inference=seeds.inference + 1))
    assert moved.flip_rate != result.inference.flip_rate
    assert moved.eval == result.inference.eval  # eval mode draws nothing


def test_settings_without_randomness_never_flip(tiny_data):
    by_setting = {(c.dropout1, c.dropout2): train(c, tiny_data).inference for c in cells()}
    for setting in ((0.0, 0.0), (1.0, 1.0)):
        r = by_setting[setting]
        assert r.flip_rate == 0.0 and r.unstable_share == 0.0 and r.flip_example is None
    # Without dropout every pass is the eval pass (the average of T equal softmaxes may round).
    none = by_setting[(0.0, 0.0)]
    assert none.mc.accuracy == none.eval.accuracy
    assert none.mc.nll == pytest.approx(none.eval.nll, rel=1e-12)
    # At p = 1 the passes zero both hidden layers, as in training; eval mode lets them through.
    assert by_setting[(1.0, 1.0)].mc.nll == pytest.approx(math.log(10), abs=0.01)
    live = by_setting[(0.5, 0.5)]
    assert live.flip_rate > 0 and live.unstable_share >= live.flip_rate
    assert live.flip_example is not None


def test_sfc64_masks_of_two_settings_are_nested():
    small = inference.PassMasks((0.2, 0.5), "sfc64", 11, 0)
    large = inference.PassMasks((0.5, 0.5), "sfc64", 11, 0)
    h = torch.ones(30, 16)
    kept_small = small.apply(0, h, slice(0, 30), 30) != 0
    kept_large = large.apply(0, h, slice(0, 30), 30) != 0
    assert kept_large.sum() < kept_small.sum() and not (kept_large & ~kept_small).any()


def test_slices_draw_the_masks_of_the_whole_test_set(tiny_data, monkeypatch):
    cell = cells()[2]
    net, result = fit(cell, tiny_data)
    monkeypatch.setattr(inference, "CHUNK", 7)
    sliced, whole = inference.mc_passes(cell, net, tiny_data, seeds_of(cell)), result.inference
    # Same masks; GEMMs over other row counts may round the last bits differently.
    assert (sliced.flip_rate, sliced.unstable_share, sliced.flip_example) == \
        (whole.flip_rate, whole.unstable_share, whole.flip_example)
    for a, b in ((sliced.eval, whole.eval), (sliced.mc, whole.mc)):
        assert (a.accuracy, a.nll, a.ece) == pytest.approx((b.accuracy, b.nll, b.ece), abs=1e-8)


def test_a_diverged_run_makes_no_passes(tiny_data):
    cell = cells(training={"epochs": 1, "batch_size": 64, "lr": 1e30})[2]
    result = train(cell, tiny_data)
    assert result.status == "diverged" and result.inference is None


@pytest.mark.parametrize("lockstep", [False, True], ids=["side-by-side", "lockstep"])
def test_members_make_their_twins_passes(tiny_data, lockstep):
    group = cells(execution="batched")
    for result, net in batched.fit_many(group, tiny_data, lockstep):
        cell = result.cell
        # Same code, same weights: exactly the passes of the member's own weights ...
        assert replace(inference.mc_passes(cell, net, tiny_data, seeds_of(cell)),
                       seconds=0) == replace(result.inference, seconds=0)
        # ... and, as the twin's weights differ only in the last bits, its numbers.
        twin = train(replace(cell, config=replace(cell.config, execution="sequential")),
                     tiny_data).inference
        assert result.inference.flip_rate == pytest.approx(twin.flip_rate, abs=0.01)
        assert result.inference.mc.accuracy == pytest.approx(twin.mc.accuracy, abs=0.01)


def test_workers_and_the_analysis_count_the_same_ece_bins():
    from study import results

    assert inference.ECE_BINS == results.ECE_BINS == 15
