"""Protocol files: what a study repeats, loaded into frozen, validated dataclasses.

    python -m study plan protocols/d2l-dropout.yaml --set training.epochs=1 --set seeds.count=2

Every unknown key, wrong type or impossible value is a `ProtocolError` that names the file, the
dotted key and the offending value. Validation is pydantic's (strict, extra keys forbidden); this
module only declares the schema and turns pydantic's report into one readable message.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, model_validator
from pydantic.dataclasses import dataclass

# Extra keys are errors; scalars are strict (no "10" for 10), containers accept YAML lists.
_STRICT = ConfigDict(extra="forbid")

Probability = Annotated[float, Field(ge=0.0, le=1.0, strict=True)]
Setting = tuple[Probability, Probability]
Device = Literal["cpu", "cuda"]
Determinism = Literal["default", "benchmark", "strict", "portable"]
Implementation = Literal["torch", "scratch", "scratch-randn"]
Execution = Literal["sequential", "batched"]
Randomness = Literal["native", "portable"]
Threads = Annotated[int, Field(gt=0, strict=True)]
# Which random streams follow the cell's seed; the others stay at `seeds.fixed`. `bitflip`:
# every stream stays fixed and the seed flips the lowest mantissa bit of one initial weight.
Vary = Literal["all", "init", "data", "dropout", "bitflip"]


class ProtocolError(ValueError):
    """A protocol file or override that cannot describe a study."""


@dataclass(frozen=True, config=_STRICT)
class Model:
    arch: Literal["mlp", "lenet"] = "mlp"
    hidden: tuple[Annotated[int, Field(gt=0, strict=True)], ...] = (256, 256)
    init_std: Annotated[float, Field(gt=0, strict=True)] = 0.01
    # d2l's MLP draws weights from N(0, init_std); its LeNet chapter uses Xavier.
    init: Literal["normal", "xavier"] = "normal"


@dataclass(frozen=True, config=_STRICT)
class Training:
    epochs: Annotated[int, Field(gt=0, strict=True)] = 10
    batch_size: Annotated[int, Field(gt=0, strict=True)] = 256
    lr: Annotated[float, Field(gt=0, strict=True)] = 0.5
    optimizer: Literal["sgd"] = "sgd"


@dataclass(frozen=True, config=_STRICT)
class Data:
    dataset: Literal["fashion-mnist"] = "fashion-mnist"
    # First N training images (a fixed subset, the same for every seed); null means all 60k.
    train_subset: Annotated[int, Field(gt=0, strict=True)] | None = None


@dataclass(frozen=True, config=_STRICT)
class Seeds:
    count: Annotated[int, Field(gt=0, strict=True)] | None = None
    start: Annotated[int, Field(ge=0, strict=True)] = 0
    list: tuple[Annotated[int, Field(ge=0, strict=True)], ...] | None = None
    # Seed of the streams held fixed when `vary` names a single source.
    fixed: Annotated[int, Field(ge=0, strict=True)] = 0

    @model_validator(mode="after")
    def _one_form(self) -> Seeds:
        if (self.count is None) == (self.list is None):
            raise ValueError("give exactly one of 'count' or 'list'")
        if self.list is not None and (not self.list or len(set(self.list)) != len(self.list)):
            raise ValueError(f"'list' must be non-empty and without repeats, got {list(self.list)}")
        return self

    def values(self) -> tuple[int, ...]:
        if self.list is not None:
            return self.list
        assert self.count is not None
        return tuple(range(self.start, self.start + self.count))


@dataclass(frozen=True, config=_STRICT)
class Analysis:
    alpha: Annotated[float, Field(gt=0, lt=1, strict=True)] = 0.05
    # Equivalence margin for TOST, in accuracy units (0.005 = 0.5 percentage points).
    equivalence_margin: Annotated[float, Field(gt=0, lt=1, strict=True)] = 0.005
    bootstrap: Annotated[int, Field(ge=100, strict=True)] = 10_000
    power: Annotated[float, Field(gt=0, lt=1, strict=True)] = 0.8


def _nonempty(items: tuple) -> tuple:
    if not items:
        raise ValueError("must not be empty")
    if len(set(items)) != len(items):
        raise ValueError(f"must not repeat entries, got {list(items)}")
    return items


@dataclass(frozen=True, config=_STRICT)
class Protocol:
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
    dropout: tuple[Setting, ...]
    seeds: Seeds
    baseline: Setting
    description: Annotated[str, Field(strict=True)] = ""
    model: Model = Model()
    training: Training = Training()
    data: Data = Data()
    devices: tuple[Device, ...] = ("cpu",)
    # Devices whose absence is an error rather than a skip.
    required_devices: tuple[Device, ...] = ()
    determinism: tuple[Determinism, ...] = ("default",)
    implementations: tuple[Implementation, ...] = ("torch",)
    vary: tuple[Vary, ...] = ("all",)
    execution: Execution = "sequential"
    # Cells trained together as one batched model (execution: batched); no effect otherwise.
    batch_members: Annotated[int, Field(gt=0, strict=True)] = 60
    randomness: Randomness = "native"
    replicates: Annotated[int, Field(gt=0, strict=True)] = 1
    # CPU threads for torch; null keeps torch's default (recorded either way). A list makes
    # threads an axis of the plan, like determinism.
    threads: Threads | tuple[Threads, ...] | None = None
    analysis: Analysis = Analysis()

    @model_validator(mode="after")
    def _consistent(self) -> Protocol:
        for key in ("dropout", "devices", "determinism", "implementations", "vary"):
            try:
                _nonempty(getattr(self, key))
            except ValueError as err:
                raise ValueError(f"{key}: {err}") from None
        if self.baseline not in self.dropout:
            raise ValueError(f"baseline: {list(self.baseline)} is not one of the dropout settings")
        if missing := set(self.required_devices) - set(self.devices):
            raise ValueError(f"required_devices: {sorted(missing)} not listed in devices")
        if isinstance(self.threads, tuple):
            try:
                _nonempty(self.threads)
            except ValueError as err:
                raise ValueError(f"threads: {err}") from None
        if "portable" in self.determinism and self.randomness != "portable":
            raise ValueError("determinism: 'portable' requires randomness: portable (mask streams "
                             f"the same on every device), got randomness: {self.randomness}")
        if "portable" in self.determinism and self.threads is None:
            raise ValueError("determinism: 'portable' requires threads: a fixed count, got null")
        if self.model.arch == "mlp" and len(self.model.hidden) != 2:
            raise ValueError(f"model.hidden: the MLP has two dropout layers, got {list(self.model.hidden)}")
        return self

    def thread_counts(self) -> tuple[int | None, ...]:
        return self.threads if isinstance(self.threads, tuple) else (self.threads,)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (tuples become lists), the form logged and hashed."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


_ADAPTER = TypeAdapter(Protocol)


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Protocol:
    """Read a protocol file, apply `key=value` overrides, and validate the result."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ProtocolError(f"{path}: no such protocol file") from None
    except yaml.YAMLError as err:
        raise ProtocolError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ProtocolError(f"{path}: expected a mapping of keys at the top, got {raw!r}")
    for item in overrides:
        raw = apply_override(raw, item, path)
    return parse(raw, source=str(path))


def parse(raw: dict[str, Any], source: str = "<protocol>") -> Protocol:
    try:
        return _ADAPTER.validate_python(raw)
    except ValidationError as err:
        raise ProtocolError(_describe(err, raw, source)) from None


def apply_override(raw: dict[str, Any], item: str, path: Path | str = "--set") -> dict[str, Any]:
    """Return a copy of `raw` with one dotted `key=value` set; the value is parsed as YAML."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ProtocolError(f"{path}: --set {item!r}: expected key=value")
    value = yaml.safe_load(text)
    out = json.loads(json.dumps(raw))
    node = out
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            raise ProtocolError(f"{path}: --set {key}: '{where}' holds {child!r}, not a mapping")
        node = child
    node[parts[-1]] = value
    return out


def _describe(err: ValidationError, raw: dict[str, Any], source: str) -> str:
    lines = [f"{source}: invalid protocol"]
    for e in err.errors():
        # pydantic's union/literal branches add tags like 'function-after[...]' to the path.
        key = ".".join(str(p) for p in e["loc"] if "[" not in str(p))
        message = e["msg"].removeprefix("Value error, ")
        if key:
            lines.append(f"  key '{key}': {message} (value: {e.get('input')!r})")
        else:  # a check across keys: its message names the key and the value itself
            lines.append(f"  {message}")
    return "\n".join(lines)
