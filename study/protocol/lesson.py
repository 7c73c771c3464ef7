"""A lesson file: the protocols that together test the lesson, and which claims each answers.

    python -m study paper protocols/lesson.yaml

Validated like a protocol file (`study.protocol`): every unreadable file, unknown key, unknown
claim or missing protocol file is a `ProtocolError` line naming the file, the key and the value.
Protocol files are named relative to the lesson file's folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, TypeAdapter, ValidationError, field_validator, model_validator
from pydantic.dataclasses import dataclass

from study.protocol.schema import STRICT, Protocol, ProtocolError, describe, parse_yaml, read_text, short
from study.protocol.schema import load as load_protocol

# Every claim of the lesson, in the order the paper gives them. C1-C5 and C3' have a section
# builder in study.report.claims; C6 and C7 are the lesson's too (issue 13), worded in
# study.report.scorecard until their builders land. A test keeps the three lists in step.
CLAIM_KEYS = ("C1", "C2", "C3", "C3\u2032", "C4", "C5", "C6", "C7")
# YAML files are typed on keyboards without a prime: C3' means C3′.
_SPELLINGS = {"C3'": "C3\u2032"}

ClaimKey = Annotated[str, Field(strict=True)]


def _claim(key: str) -> str:
    key = _SPELLINGS.get(key, key)
    if key not in CLAIM_KEYS:
        raise ValueError(f"unknown claim {key!r}; the lesson's claims are {', '.join(CLAIM_KEYS)}")
    return key


@dataclass(frozen=True, config=STRICT)
class Entry:
    """One protocol of the lesson and the claims it answers."""

    file: Annotated[str, Field(min_length=1, strict=True)]
    claims: tuple[ClaimKey, ...]
    # Recorded cost of one cell (training and logging), for the estimate printed before a run
    # when the store has no finished run of this protocol to measure it from.
    seconds_per_run: Annotated[float, Field(gt=0, strict=False)]

    @field_validator("claims")
    @classmethod
    def _known(cls, claims: tuple[str, ...]) -> tuple[str, ...]:
        if not claims:
            raise ValueError("must not be empty")
        return tuple(_claim(k) for k in claims)


@dataclass(frozen=True, config=STRICT)
class Open:
    """A claim no listed protocol answers yet, and what would measure it."""

    claim: ClaimKey
    why: Annotated[str, Field(min_length=1, strict=True)]
    command: Annotated[str, Field(min_length=1, strict=True)]

    @field_validator("claim")
    @classmethod
    def _known(cls, claim: str) -> str:
        return _claim(claim)


@dataclass(frozen=True, config=STRICT)
class Lesson:
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
    protocols: tuple[Entry, ...]
    description: Annotated[str, Field(strict=True)] = ""
    open: tuple[Open, ...] = ()

    @model_validator(mode="after")
    def _consistent(self) -> Lesson:
        if not self.protocols:
            raise ValueError("protocols: must list at least one protocol file")
        files = [e.file for e in self.protocols]
        if repeated := sorted({f for f in files if files.count(f) > 1}):
            raise ValueError(f"protocols: {repeated} listed more than once")
        answered = {k for e in self.protocols for k in e.claims}
        if both := sorted(answered & {o.claim for o in self.open}):
            raise ValueError(f"open: {both} answered by a listed protocol too; drop the open "
                             "entry")
        return self

    @property
    def experiment(self) -> str:
        """The MLflow experiment that holds the paper's analysis run."""
        return f"{self.name}-paper"

    def answering(self, claim: str) -> list[Entry]:
        return [e for e in self.protocols if claim in e.claims]

    def open_entry(self, claim: str) -> Open | None:
        return next((o for o in self.open if o.claim == claim), None)


@dataclass(frozen=True)
class Part:
    """A listed protocol, loaded: its entry, its file and the validated protocol."""

    entry: Entry
    path: Path
    protocol: Protocol


_ADAPTER = TypeAdapter(Lesson)


def load(path: str | Path) -> Lesson:
    """Read and validate a lesson file (its protocol files are loaded by `parts`)."""
    path = Path(path)
    raw = parse_yaml(read_text(path), str(path))
    if not isinstance(raw, dict):
        raise ProtocolError(f"{path}: expected a mapping of keys at the top, got {short(raw)}")
    try:
        return _ADAPTER.validate_python(raw)
    except ValidationError as err:
        raise ProtocolError(describe(err, str(path), root=Lesson)) from None


def parts(lesson: Lesson, path: str | Path, overrides: list[str] = ()) -> list[Part]:
    """Every listed protocol loaded and validated, `overrides` (`key=value`) applied to each.

    All files are checked before anything runs: one bad file is reported with every other."""
    folder = Path(path).parent
    loaded, errors = [], []
    for i, entry in enumerate(lesson.protocols):
        file = folder / entry.file
        if not file.is_file():
            errors.append(f"{path}: protocols.{i}.file: no such protocol file "
                          f"(value: {entry.file!r}, looked for {file})")
            continue
        try:
            loaded.append(Part(entry, file, load_protocol(file, overrides)))
        except ProtocolError as err:
            errors.append(str(err))
    if errors:
        raise ProtocolError("\n".join(errors))
    names = [p.protocol.name for p in loaded]
    if repeated := sorted({n for n in names if names.count(n) > 1}):
        raise ProtocolError(f"{path}: protocols: two files name the same experiment {repeated}; "
                            "their runs would mix")
    return loaded


__all__ = ["CLAIM_KEYS", "Entry", "Lesson", "Open", "Part", "load", "parts"]
