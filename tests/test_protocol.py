from pathlib import Path

import pytest
import yaml

from study.protocol import schema as protocol
from study.protocol.schema import ProtocolError

# Lesson files (a list of protocols, tests/test_paper.py) share the folder with the protocols.
PROTOCOLS = sorted(p for p in Path(__file__).resolve().parents[1].glob("protocols/*.yaml")
                   if "protocols" not in yaml.safe_load(p.read_text()))
D2L = Path(__file__).resolve().parents[1] / "protocols" / "d2l-dropout.yaml"


@pytest.mark.parametrize("path", PROTOCOLS, ids=lambda p: p.name)
def test_shipped_protocols_load(path):
    proto = protocol.load(path)
    assert proto.name == path.stem
    assert proto.baseline in proto.dropout


def test_d2l_protocol_is_the_textbook_setup():
    proto = protocol.load(D2L)
    assert proto.model.hidden == (256, 256) and proto.model.init_std == 0.01
    assert (proto.training.epochs, proto.training.batch_size, proto.training.lr) == (10, 256, 0.5)
    assert proto.dropout == ((0.0, 0.0), (0.2, 0.5), (0.6, 0.8), (0.8, 0.6), (0.9, 0.9), (1.0, 1.0))
    assert len(proto.seeds.values()) >= 10
    assert proto.baseline == (0.2, 0.5)


def test_overrides_follow_the_file_keys():
    proto = protocol.load(D2L, ["training.epochs=1", "seeds.count=2"])
    assert proto.training.epochs == 1
    assert proto.seeds.values() == (0, 1)
    assert protocol.load(D2L).training.epochs == 10  # the file itself is untouched


def _write(tmp_path, **changes) -> Path:
    raw = yaml.safe_load(D2L.read_text())
    for key, value in changes.items():
        if value is None:
            raw.pop(key)
        else:
            raw[key] = value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("changes, key, value", [
    ({"colour": "red"}, "colour", "'red'"),
    ({"dropout": [[0.2, 1.5]], "baseline": [0.2, 1.5]}, "dropout.0.1", "1.5"),
    ({"dropout": [[-0.1, 0.5]], "baseline": [-0.1, 0.5]}, "dropout.0.0", "-0.1"),
    ({"training": {"epochs": "ten"}}, "training.epochs", "'ten'"),
    ({"training": {"epochs": 0}}, "training.epochs", "0"),
    ({"seeds": {"list": []}}, "seeds", "[]"),
    ({"seeds": {"count": 0}}, "seeds.count", "0"),
    ({"devices": ["tpu"]}, "devices.0", "'tpu'"),
    ({"baseline": [0.3, 0.3]}, "baseline", "[0.3, 0.3]"),
    ({"model": {"hidden": [256, 256], "init_std": 0.01, "depth": 3}}, "model.depth", "3"),
    ({"inference": {"mc_passes": -2}}, "inference.mc_passes", "-2"),
    ({"inference": {"mc_passes": 1}}, "inference.mc_passes", "1"),
    ({"inference": {"mc_passes": "8"}}, "inference.mc_passes", "'8'"),
    ({"inference": {"passes": 8}}, "inference.passes", "8"),
])
def test_bad_values_name_file_key_and_value(tmp_path, changes, key, value):
    path = _write(tmp_path, **changes)
    with pytest.raises(ProtocolError) as err:
        protocol.load(path)
    message = str(err.value)
    assert str(path) in message
    assert f"'{key}'" in message or f"{key}:" in message
    assert value in message


def test_missing_required_key(tmp_path):
    with pytest.raises(ProtocolError, match="seeds"):
        protocol.load(_write(tmp_path, seeds=None))


def test_empty_seed_set_and_both_forms(tmp_path):
    with pytest.raises(ProtocolError, match="exactly one"):
        protocol.load(_write(tmp_path, seeds={"count": 2, "list": [1, 2]}))


def test_not_a_mapping_and_missing_file(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ProtocolError, match="mapping"):
        protocol.load(path)
    with pytest.raises(ProtocolError, match="no such protocol file"):
        protocol.load(tmp_path / "absent.yaml")


def test_override_errors():
    with pytest.raises(ProtocolError, match="key=value"):
        protocol.load(D2L, ["training.epochs"])
    with pytest.raises(ProtocolError, match="not a mapping"):
        protocol.load(D2L, ["name.first=1"])
    with pytest.raises(ProtocolError, match="training.epochs"):
        protocol.load(D2L, ["training.epochs=-1"])


def test_seed_list_form():
    proto = protocol.load(D2L, ["seeds={list: [5, 7]}", "adaptive=null"])  # rounds need a count
    assert proto.seeds.values() == (5, 7)


def test_to_dict_round_trips():
    proto = protocol.load(D2L)
    assert protocol.parse(proto.to_dict()) == proto


def test_portable_mode_needs_portable_masks_and_a_thread_count(tmp_path):
    base = protocol.load(D2L).to_dict()
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({**base, "determinism": ["portable"], "randomness": "native",
                                    "threads": 1}))
    with pytest.raises(protocol.ProtocolError) as err:
        protocol.load(path)
    message = str(err.value).splitlines()[-1]
    assert "determinism: 'portable'" in message and "randomness: native" in message
    path.write_text(yaml.safe_dump({**base, "determinism": ["portable"], "randomness": "portable",
                                    "threads": None}))
    with pytest.raises(protocol.ProtocolError, match="requires threads"):
        protocol.load(path)
    path.write_text(yaml.safe_dump({**base, "determinism": ["portable"], "randomness": "portable",
                                    "threads": [1, 2]}))
    assert protocol.load(path).thread_counts() == (1, 2)
