"""Protocol files: what a study repeats, loaded into frozen, validated dataclasses.

    python -m study plan protocols/d2l-dropout.yaml --set training.epochs=1 --set seeds.count=2

Every unreadable file, malformed YAML, repeated key, unknown key, wrong type or impossible value
is a `ProtocolError` with one line per problem, each naming the file, the dotted key and the
offending value. Validation is pydantic's (strict, extra keys forbidden, no inf or NaN); this
module declares the schema and turns pydantic's report into those lines.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (ConfigDict, Field, TypeAdapter, ValidationError, ValidationInfo,
                      field_validator, model_validator)
from pydantic.dataclasses import dataclass

# Training images per dataset, so `plan` rejects a subset larger than the data without loading it.
from study.protocol.plan import TRAIN_IMAGES, is_evaluated

# Extra keys are errors; scalars are strict (no "10" for 10), containers accept YAML lists.
# YAML reads `.inf` and `.nan` as floats; no rate, margin or std of a study is either.
STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)
# Longest value repr in an error line: a whole mapping would drown the key it belongs to.
_VALUE_CHARS = 60

Probability = Annotated[float, Field(ge=0.0, le=1.0, strict=True)]
Setting = tuple[Probability, Probability]
Device = Literal["cpu", "cuda"]
Determinism = Literal["default", "benchmark", "strict", "portable"]
Implementation = Literal["torch", "scratch", "scratch-randn"]
Execution = Literal["sequential", "batched"]
Randomness = Literal["native", "portable"]
# GEMM paths of `portable` CPU cells (study.engine.kernels.KERNELS); `torch` reproduces runs
# recorded before the OpenBLAS path existed.
Kernels = Literal["openblas-haswell", "torch"]
Threads = Annotated[int, Field(gt=0, strict=True)]
# Which random streams follow the cell's seed; the others stay at `seeds.fixed`. `bitflip`:
# every stream stays fixed and the seed flips the lowest mantissa bit of one initial weight.
Vary = Literal["all", "init", "data", "dropout", "bitflip"]


class ProtocolError(ValueError):
    """A protocol file or override that cannot describe a study."""


def _nonempty(items: tuple) -> tuple:
    if not items:
        raise ValueError("must not be empty")
    if len(set(items)) != len(items):
        raise ValueError("must not repeat entries")
    return items


@dataclass(frozen=True, config=STRICT)
class Model:
    arch: Literal["mlp", "lenet"] = "mlp"
    hidden: tuple[Annotated[int, Field(gt=0, strict=True)], ...] = (256, 256)
    init_std: Annotated[float, Field(gt=0, strict=True)] = 0.01
    # d2l's MLP draws weights from N(0, init_std); its LeNet chapter uses Xavier.
    init: Literal["normal", "xavier"] = "normal"


Epochs = Annotated[int, Field(gt=0, strict=True)]
# First N training images; null means all of them.
Subset = Annotated[int, Field(gt=0, strict=True)] | None


@dataclass(frozen=True, config=STRICT)
class SizeBudget:
    """The budget of the cells trained on one training-set size: small sets need many more
    passes to be fitted, and their test evaluation (10k images) costs more than an epoch."""

    train_subset: Subset
    epochs: Epochs
    eval_every: Epochs = 1
    # A smaller set may need a smaller step: at 1,000 images lr 0.3 still has loss spikes late
    # in training. Null keeps training.lr.
    lr: Annotated[float, Field(gt=0, strict=True)] | None = None


@dataclass(frozen=True, config=STRICT)
class Training:
    epochs: Epochs = 10
    batch_size: Annotated[int, Field(gt=0, strict=True)] = 256
    lr: Annotated[float, Field(gt=0, strict=True)] = 0.5
    optimizer: Literal["sgd"] = "sgd"
    # Test accuracy every K epochs, and always after the last one; `last:K` endpoints count
    # evaluated epochs. 1 (every epoch) is d2l's loop.
    eval_every: Epochs = 1
    # Per training-set size, its own epochs and eval_every (sizes not listed keep the two above).
    by_size: tuple[SizeBudget, ...] = ()

    def for_size(self, n: int | None) -> Training:
        """The budget one cell trains with: its size's entry resolved, `by_size` dropped."""
        entry = next((b for b in self.by_size if b.train_subset == n), None)
        if entry is None:
            return dataclasses.replace(self, by_size=())
        return dataclasses.replace(self, epochs=entry.epochs, eval_every=entry.eval_every,
                                   lr=self.lr if entry.lr is None else entry.lr, by_size=())

    def evaluated(self, epoch: int) -> bool:
        return is_evaluated(epoch, self.eval_every, self.epochs)


@dataclass(frozen=True, config=STRICT)
class Data:
    dataset: Literal["fashion-mnist"] = "fashion-mnist"
    # First N training images in file order (a fixed subset, the same for every seed, and
    # nested: a smaller size is the start of a larger one); null means all 60k. A list makes
    # the training-set size an axis of the plan, like threads.
    train_subset: Subset | tuple[Subset, ...] = None

    @field_validator("train_subset")
    @classmethod
    def _within_dataset(cls, n: int | None | tuple, info: ValidationInfo) -> int | None | tuple:
        size = TRAIN_IMAGES.get(info.data.get("dataset", ""))
        sizes = n if isinstance(n, tuple) else (n,)
        if too_big := [k for k in sizes if k is not None and size is not None and k > size]:
            raise ValueError(f"{too_big[0]} exceeds the {size} training images of "
                             f"{info.data['dataset']}")
        if isinstance(n, tuple):
            _nonempty(n)
        return n

    def sizes(self) -> tuple[int | None, ...]:
        return self.train_subset if isinstance(self.train_subset, tuple) else (self.train_subset,)


@dataclass(frozen=True, config=STRICT)
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


@dataclass(frozen=True, config=STRICT)
class Analysis:
    alpha: Annotated[float, Field(gt=0, lt=1, strict=True)] = 0.05
    # Equivalence margin for TOST, in the metric's units (for accuracy 0.005 = 0.5 points).
    equivalence_margin: Annotated[float, Field(gt=0, strict=True)] = 0.005
    bootstrap: Annotated[int, Field(ge=100, strict=True)] = 10_000
    power: Annotated[float, Field(gt=0, lt=1, strict=True)] = 0.8
    # The primary endpoint: `final` (the last epoch's test accuracy) or `last:K` (the mean of the
    # last K evaluated epochs). The robustness set (results.ROBUSTNESS_ENDPOINTS) runs beside it.
    endpoint: Annotated[str, Field(pattern=r"^(final|last:[1-9][0-9]*)$", strict=True)] = "final"
    # Pairs of settings compared with each other, [setting, reference] (gap = setting - reference),
    # beside the comparisons with the baseline and in a Holm family of their own.
    contrasts: tuple[tuple[Setting, Setting], ...] = ()
    # The names the runs were logged under (`study analyze --factor/--seed/--metric`), for an
    # experiment logged outside the harness: a setting is the tuple of the `factor` params'
    # values; `lower_is_better` for a loss or an error, so "better" reads the right way round.
    factor: tuple[Annotated[str, Field(min_length=1, strict=True)], ...] = ("dropout1", "dropout2")
    seed: Annotated[str, Field(min_length=1, strict=True)] = "seed"
    metric: Annotated[str, Field(min_length=1, strict=True)] = "test_acc"
    lower_is_better: Annotated[bool, Field(strict=True)] = False


@dataclass(frozen=True, config=STRICT)
class Inference:
    # Stochastic forward passes over the test set with dropout left on, made after training
    # with masks from the run's `inference` stream (0: none). MC-averaged and eval-mode
    # predictions are then scored side by side (claim C7).
    mc_passes: Annotated[int, Field(ge=0, strict=True)] = 0

    @field_validator("mc_passes")
    @classmethod
    def _pairs(cls, n: int) -> int:
        if n == 1:
            raise ValueError("one pass has no second pass to flip against; give 0 or >= 2")
        return n


@dataclass(frozen=True, config=STRICT)
class Adaptive:
    """Seeds added in rounds until each comparison's anytime-valid verdict settles
    (`study.analysis.sequential`, docs/statistics.md "Adaptive studies"). Every setting starts
    with `seeds.count` seeds; each round adds `round` to the settings of the open comparisons."""

    round: Annotated[int, Field(gt=0, strict=True)] = 5
    # Seeds per setting at which a comparison stops, settled or not.
    max_seeds: Annotated[int, Field(ge=2, strict=True)] = 60
    # Training runs the whole study may hold (replicates included); no round starts past it.
    max_runs: Annotated[int, Field(gt=0, strict=True)] = 400
    # settled: stop once no later seed can change what the report says; first: at the first
    # verdict other than inconclusive (fewer seeds, "different" for some gaps inside the margin).
    stop: Literal["settled", "first"] = "settled"
    # Which comparisons decide the rounds (docs/statistics.md "Which comparisons drive the
    # rounds"): baseline (every setting against the baseline), contrasts (the declared ones),
    # implementations (each hand-written dropout against torch at the same setting), mc (MC-
    # averaged against eval-mode accuracy, within each run). None: every kind the protocol has.
    compare: tuple[Literal["baseline", "contrasts", "implementations", "mc"], ...] | None = None


@dataclass(frozen=True, config=STRICT)
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
    # Where `portable` CPU cells run their GEMMs: numpy's OpenBLAS pinned to its Haswell kernels
    # (same bits on Intel and AMD at near-native speed), or torch's MKL on its COMPATIBLE branch
    # (`torch`, the path before issue 22, ~2.4x slower). Other modes and CUDA ignore it.
    kernels: Kernels = "openblas-haswell"
    replicates: Annotated[int, Field(gt=0, strict=True)] = 1
    # CPU threads for torch; null keeps torch's default (recorded either way). A list makes
    # threads an axis of the plan, like determinism.
    threads: Threads | tuple[Threads, ...] | None = None
    analysis: Analysis = Analysis()
    inference: Inference = Inference()
    # null: every setting runs seeds.count seeds (a fixed design).
    adaptive: Adaptive | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Protocol:
        for key in ("dropout", "devices", "determinism", "implementations", "vary"):
            try:
                _nonempty(getattr(self, key))
            except ValueError as err:
                value = json.loads(json.dumps(getattr(self, key)))  # lists, as in the file
                raise ValueError(f"{key}: {err} (value: {value})") from None
        if self.baseline not in self.dropout:
            raise ValueError(f"baseline: {list(self.baseline)} is not one of the dropout settings")
        for a, b in self.analysis.contrasts:
            for side in (a, b):
                if side not in self.dropout:
                    raise ValueError(f"analysis.contrasts: {list(side)} is not one of the dropout "
                                     "settings")
            if a == b:
                raise ValueError(f"analysis.contrasts: {list(a)} against itself")
        self._check_budgets()
        self._check_adaptive()
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

    def _check_budgets(self) -> None:
        named = [b.train_subset for b in self.training.by_size]
        sizes = self.data.sizes()
        for n in named:
            if n not in sizes:
                raise ValueError(f"training.by_size: train_subset {_size_text(n)} is not one of "
                                 f"data.train_subset {_size_text(self.data.train_subset)}")
        if len(set(named)) != len(named):
            raise ValueError(f"training.by_size: a train_subset given twice (value: "
                             f"{_size_text(named)})")

    def _check_adaptive(self) -> None:
        if self.adaptive is None:
            return
        if self.seeds.count is None:
            raise ValueError(f"adaptive: needs seeds.count (rounds add seeds after "
                             f"start + count), got seeds.list {list(self.seeds.list)}")
        if self.adaptive.max_seeds < self.seeds.count:
            raise ValueError(f"adaptive.max_seeds: {self.adaptive.max_seeds} is below "
                             f"seeds.count {self.seeds.count}")
        compare = self.adaptive.compare
        if compare is not None and (missing := [k for k in compare
                                                if k not in self.comparison_kinds()]):
            raise ValueError(f"adaptive.compare: {missing} not in this protocol, which has "
                             f"{list(self.comparison_kinds())} (value: {list(compare)})")
        if compare is not None and not compare:
            raise ValueError("adaptive.compare: must name at least one kind (value: [])")

    def comparison_kinds(self) -> tuple[str, ...]:
        """The kinds of comparison this protocol's analysis makes that can drive adaptive
        rounds (`Adaptive.compare`): baseline always; the others where the protocol has them."""
        kinds = ["baseline"]
        if self.analysis.contrasts:
            kinds.append("contrasts")
        if "torch" in self.implementations and len(self.implementations) > 1:
            kinds.append("implementations")
        if self.inference.mc_passes > 0:
            kinds.append("mc")
        return tuple(kinds)

    def driving_kinds(self) -> tuple[str, ...]:
        """The kinds that decide an adaptive protocol's rounds: `adaptive.compare`, or all."""
        chosen = self.adaptive.compare if self.adaptive is not None else None
        return chosen if chosen is not None else self.comparison_kinds()

    def thread_counts(self) -> tuple[int | None, ...]:
        return self.threads if isinstance(self.threads, tuple) else (self.threads,)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (tuples become lists), the form logged and hashed."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


def _size_text(n: Any) -> str:
    return json.dumps(json.loads(json.dumps(n)))  # null and lists, as in the file


_ADAPTER = TypeAdapter(Protocol)


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Protocol:
    """Read a protocol file, apply `key=value` overrides, and validate the result."""
    path = Path(path)
    raw = parse_yaml(read_text(path), str(path))
    if not isinstance(raw, dict):
        raise ProtocolError(f"{path}: expected a mapping of keys at the top, got {short(raw)}")
    for item in overrides:
        raw = apply_override(raw, item, path)
    return parse(raw, source=str(path), overridden=[_override_key(item) for item in overrides])


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProtocolError(f"{path}: no such protocol file") from None
    except IsADirectoryError:
        raise ProtocolError(f"{path}: is a directory; give one protocol file, e.g. "
                            f"{path / 'NAME.yaml'}") from None
    except UnicodeDecodeError as err:
        raise ProtocolError(f"{path}: not UTF-8 text (byte {err.start}); is it a protocol "
                            "file?") from None
    except OSError as err:
        raise ProtocolError(f"{path}: cannot be read: {err.strerror}") from None


class _UniqueKeys(yaml.SafeLoader):
    """YAML's loader lets a repeated key silently overwrite the first; here it is an error."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, yaml.Node] = {}
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, value_node)
            except TypeError:  # an unhashable key: SafeLoader's own error names it
                continue
            if first is not value_node:
                values = [short(self.construct_object(n, deep=True)) for n in (first, value_node)]
                raise yaml.MarkedYAMLError(
                    problem=f"key {key!r} is given twice ({values[0]} on line "
                            f"{first.start_mark.line + 1}, {values[1]} on line "
                            f"{value_node.start_mark.line + 1}); keep one",
                    problem_mark=key_node.start_mark)
        return super().construct_mapping(node, deep)


def parse_yaml(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_UniqueKeys)  # noqa: S506 (a SafeLoader subclass)
    except yaml.MarkedYAMLError as err:
        # PyYAML's message spans several lines with a caret drawing; one line says the same.
        mark = err.problem_mark
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ProtocolError(f"{where}: {at}not valid YAML: {err.problem}") from None
    except yaml.YAMLError as err:
        raise ProtocolError(f"{where}: not valid YAML: {' '.join(str(err).split())}") from None


def parse(raw: dict[str, Any], source: str = "<protocol>",
          overridden: list[str] = ()) -> Protocol:
    try:
        return _ADAPTER.validate_python(raw)
    except ValidationError as err:
        raise ProtocolError(describe(err, source, overridden)) from None


def _override_key(item: str) -> str:
    return item.partition("=")[0]


def apply_override(raw: dict[str, Any], item: str, path: Path | str = "--set") -> dict[str, Any]:
    """Return a copy of `raw` with one dotted `key=value` set; the value is parsed as YAML."""
    key, sep, text = item.partition("=")
    parts = key.split(".")
    if not sep or not all(parts):
        raise ProtocolError(f"{path}: --set {item!r}: expected key=value, the key dotted like "
                            "training.epochs")
    value = parse_yaml(text, f"{path}: --set {key}: value {text!r}")
    out = json.loads(json.dumps(raw))
    node = out
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            raise ProtocolError(f"{path}: --set {key}: '{where}' holds {short(child)}, "
                                "not a mapping")
        node = child
    node[parts[-1]] = value
    return out


def describe(err: ValidationError, source: str, overridden: list[str] = (),
              root: type = Protocol) -> str:
    """One line per problem: file, dotted key, what is wrong, the value, and where it was set.
    `root`: the dataclass of the file's top level, for "did you mean" suggestions."""
    entries = []
    for e in err.errors():
        # pydantic's union/literal branches add tags like 'function-after[...]' or
        # 'constrained-int' to the path; field names never hold '[' or '-'.
        loc = [str(p) for p in e["loc"] if "[" not in str(p) and "-" not in str(p)]
        key = ".".join(loc)
        message = e["msg"].removeprefix("Value error, ")
        if e["type"] == "missing" and loc and loc[-1].isdigit():  # a pair with one entry
            line = f"{'.'.join(loc[:-1])}: too few items (value: {short(e.get('input'))})"
        elif e["type"] == "missing":
            line = f"{key}: required key is missing"
        elif e["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
            line = f"{key}: unknown key{_suggest(loc, root)} (value: {short(e.get('input'))})"
        elif key:
            line = f"{key}: {message} (value: {short(e.get('input'))})"
        else:  # a check across keys: its message names the key and the value itself
            line = message
        if any(key == k or key.startswith(f"{k}.") or k.startswith(f"{key}.")
               for k in overridden if key):
            line += " (set by --set)"
        entries.append((key, f"{source}: {line}"))
    return "\n".join(_one_per_key(entries))


def _one_per_key(entries: list[tuple[str, str]]) -> list[str]:
    """A union (threads: 2 or [1, 2]) reports every branch it tried; keep the first line of a
    key, and drop a key's line when a deeper key under it says what is wrong inside it."""
    keys = [k for k, _ in entries]
    out, seen = [], set()
    for key, line in entries:
        deeper = key and any(k.startswith(f"{key}.") for k in keys)
        if key and (key in seen or deeper):
            continue
        seen.add(key)
        out.append(line)
    return out


def _suggest(loc: list[str], root: type = Protocol) -> str:
    """' (did you mean ...)' for a misspelt key, from the fields of the section it sits in."""
    section: Any = root
    for part in (p for p in loc[:-1] if not p.isdigit()):  # list indices name no section
        hints = typing.get_type_hints(section) if dataclasses.is_dataclass(section) else {}
        section = hints.get(part)
        if not dataclasses.is_dataclass(section) and typing.get_args(section):
            section = typing.get_args(section)[0]  # a list of sections: tuple[Entry, ...]
    if not dataclasses.is_dataclass(section):
        return ""
    names = [f.name for f in dataclasses.fields(section)]
    close = difflib.get_close_matches(loc[-1], names, n=1)
    return f"; did you mean '{close[0]}'?" if close else f"; expected one of {', '.join(names)}"


def short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _VALUE_CHARS else text[: _VALUE_CHARS - 3] + "..."
