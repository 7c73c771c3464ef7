import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from study.engine import model
from study.protocol import plan, schema as protocol
from study.engine.train import CHANCE, train

BASE = dict(name="t", dropout=[[0.2, 0.5]], seeds={"count": 1}, baseline=[0.2, 0.5],
            training={"epochs": 2, "batch_size": 64, "lr": 0.5})


def cell(seed: int = 0, dropout1: float = 0.2, dropout2: float = 0.5, **keys) -> plan.Cell:
    """A cell of a tiny protocol; `keys` are protocol keys (e.g. randomness="portable")."""
    c = plan.expand(protocol.parse({**BASE, **keys}))[0]
    return replace(c, seed=seed, dropout1=dropout1, dropout2=dropout2)


def test_two_cpu_runs_of_one_cell_give_the_same_weights(tiny_data):
    a, b = train(cell(), tiny_data), train(cell(), tiny_data)
    assert a.weights_sha256 == b.weights_sha256
    assert a.epochs == b.epochs


def test_strict_mode_replicates_are_bitwise_identical(tiny_data):
    from study.engine.seeding import determinism
    with determinism("strict"):
        a, b = train(cell(), tiny_data), train(cell(), tiny_data)
    assert a.weights_sha256 == b.weights_sha256


def test_another_seed_gives_other_weights(tiny_data):
    assert train(cell(seed=0), tiny_data).weights_sha256 != \
        train(cell(seed=1), tiny_data).weights_sha256


def test_it_learns_and_reports_textbook_metrics(tiny_data):
    result = train(cell(dropout1=0.0, dropout2=0.0), tiny_data)
    assert [e.epoch for e in result.epochs] == [1, 2]
    assert result.epochs[-1].test_acc > 0.5  # the tiny classes are easy; chance is 0.1
    assert result.status == "ok"


def test_dropout_one_trains_to_chance_and_is_recorded(tiny_data):
    result = train(cell(dropout1=1.0, dropout2=1.0), tiny_data)
    assert result.status == "degenerate"
    assert not result.textbook_check
    assert result.epochs[-1].test_acc == pytest.approx(CHANCE, abs=0.05)
    assert result.keep_rates == (0.0, 0.0)


def test_divergence_ends_the_run_with_a_status(tiny_data):
    c = cell()
    huge = replace(c, config=replace(c.config, training=replace(c.config.training, lr=1e12)))
    result = train(huge, tiny_data)
    assert result.status == "diverged"
    assert not math.isfinite(result.epochs[-1].train_loss)


def test_settings_share_init_and_data_order_by_seed(tiny_data):
    """Paired by seed: only the dropout differs between two settings of one seed."""
    a = train(cell(dropout1=0.0, dropout2=0.0), tiny_data)
    b = train(cell(dropout1=0.0, dropout2=0.0, seed=0), tiny_data)
    assert a.streams == b.streams
    c = train(cell(dropout1=0.5, dropout2=0.5), tiny_data)
    assert c.streams == a.streams and c.weights_sha256 != a.weights_sha256


def test_bernoulli_mask_is_nn_dropouts_own_draw_on_cpu():
    x = torch.rand(64, 300) + 0.5
    torch_gen = torch.Generator().manual_seed(7)
    with torch.random.fork_rng():
        torch.manual_seed(7)
        expected = torch.nn.functional.dropout(x, 0.3, training=True)
    assert torch.equal(x * model.scaled_mask(0.3, "bernoulli", x.shape, torch_gen), expected)


def test_portable_and_native_torch_masks_are_different_streams(tiny_data):
    native = train(cell(), tiny_data)
    portable = train(cell(randomness="portable"), tiny_data)
    assert native.weights_sha256 != portable.weights_sha256
    assert portable.weights_sha256 == train(cell(randomness="portable"), tiny_data).weights_sha256


def test_training_leaves_global_rng_alone(tiny_data):
    before = torch.random.get_rng_state()
    train(cell(), tiny_data)
    assert torch.equal(before, torch.random.get_rng_state())


@pytest.mark.parametrize("impl, p, expected", [
    ("torch", 0.5, 0.5), ("scratch", 0.5, 0.5), ("scratch-randn", 0.5, 0.3085),
    ("scratch", 0.2, 0.8), ("scratch-randn", 0.2, 0.4207)])
def test_keep_rate_of_each_implementation(impl, p, expected):
    # scratch-randn keeps P(N(0,1) > p): 1 - Phi(0.5) = 0.3085, 1 - Phi(0.2) = 0.4207.
    gen = np.random.SFC64(0) if impl == "torch" else torch.Generator().manual_seed(0)
    layer = model.KeepRate(model.make_dropout(p, impl, gen))
    layer.train()
    out = layer(torch.ones(400, 500))
    assert layer.rate() == pytest.approx(expected, abs=0.005)
    kept = out[out != 0]
    assert torch.allclose(kept, torch.full_like(kept, 1 / (1 - p)))  # every kind rescales by 1/(1-p)


def test_lenet_option_builds_and_trains(tiny_data):
    c = cell()
    lenet = replace(c, config=replace(c.config, model=protocol.Model(arch="lenet", init="xavier"),
                                      training=replace(c.config.training, epochs=1, lr=0.9)))
    result = train(lenet, tiny_data)
    assert result.status in ("ok", "degenerate")
    assert len(result.keep_rates) == 2 and result.keep_rates[0] == pytest.approx(0.8, abs=0.05)
    assert result.weights_sha256 == train(lenet, tiny_data).weights_sha256


def test_init_follows_the_textbook(tiny_data):
    gen = torch.Generator().manual_seed(0)
    net = model.build(protocol.Model(), (torch.nn.Identity(), torch.nn.Identity()), gen, "cpu")
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(256, 784), (256, 256), (10, 256)]
    assert float(linears[0].weight.detach().std()) == pytest.approx(0.01, rel=0.02)
    # Biases keep PyTorch's default range, U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    assert float(linears[0].bias.detach().abs().max()) <= 1 / 784 ** 0.5
    assert float(linears[0].bias.detach().abs().max()) > 0.5 / 784 ** 0.5


def test_sfc64_mask_matches_a_hand_split_of_the_raw_words():
    # Independent of the uint32 view: split each 64-bit word with shifts, low half first.
    raw = np.random.SFC64(11).random_raw(3)
    words = np.stack([raw & 0xFFFFFFFF, raw >> 32], 1).reshape(-1)[:5]  # 5 units: 3 words
    threshold = round(0.3 * 2**32)
    expected = torch.tensor([1 / np.float32(0.7) if w >= threshold else 0.0 for w in words],
                            dtype=torch.float32).view(1, 5)
    bits = np.random.SFC64(11)
    assert torch.equal(model.sfc64_mask(0.3, torch.Size((1, 5)), bits), expected)
    # ceil(5/2) = 3 words consumed: the next draw starts at the 4th.
    assert bits.random_raw() == np.random.SFC64(11).random_raw(4)[3]


def test_sfc64_mask_keeps_one_minus_p_and_rescales():
    mask = model.sfc64_mask(0.3, torch.Size((1000, 1000)), np.random.SFC64(0))
    kept = float((mask != 0).float().mean())
    assert abs(kept - 0.7) < 4 * math.sqrt(0.7 * 0.3 / 1e6)  # 4 standard errors
    assert set(mask.unique().tolist()) == {0.0, float(np.float32(1) / np.float32(0.7))}


def test_sfc64_mask_fills_a_buffer_and_refuses_a_strided_one():
    buf = torch.empty(8, 6)
    out = model.sfc64_mask(0.5, torch.Size((4, 6)), np.random.SFC64(2), buf[:4])
    assert out.data_ptr() == buf.data_ptr()
    assert torch.equal(buf[:4], model.sfc64_mask(0.5, torch.Size((4, 6)), np.random.SFC64(2)))
    with pytest.raises(RuntimeError):
        model.sfc64_mask(0.5, torch.Size((6, 4)), np.random.SFC64(2), buf[:4].t())


def test_bitflip_cells_differ_by_one_bit_of_one_initial_weight(tiny_data):
    from torch import nn
    from study.engine.train import initial_net, seeds_of

    def start(c: plan.Cell) -> dict[str, torch.Tensor]:
        net = initial_net(c, (nn.Identity(), nn.Identity()), seeds_of(c))
        return {k: v.detach().clone() for k, v in net.state_dict().items()}

    a, b = cell(seed=3, vary=["bitflip"]), cell(seed=4, vary=["bitflip"])
    unflipped = cell(seed=0)  # vary: all at seed 0: the fixed seed's streams
    assert a.vary == "bitflip" and seeds_of(a) == seeds_of(b) == seeds_of(unflipped)
    ref = start(unflipped)
    for c in (a, b):
        now = start(c)
        changed = [(k, int((now[k] != ref[k]).sum())) for k in ref if not torch.equal(now[k], ref[k])]
        assert len(changed) == 1 and changed[0][1] == 1 and changed[0][0].endswith("weight")
        key = changed[0][0]
        bits = (now[key].view(torch.int32) ^ ref[key].view(torch.int32)).flatten()
        assert sorted(bits.unique().tolist()) == [0, 1]  # only the lowest mantissa bit
    assert any(not torch.equal(start(a)[k], start(b)[k]) for k in ref)  # seeds pick other bits
    # One bit is enough for training to end elsewhere.
    assert train(a, tiny_data).weights_sha256 != train(b, tiny_data).weights_sha256
