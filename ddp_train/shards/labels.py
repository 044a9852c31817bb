"""Where a shard sample's label lives, and the one rule that says which samples are usable.

``ddp-shards pack`` stores the class index in a ``cls`` member. Shards written by other tools
keep the label elsewhere: ``cls`` holding a class *name*, a ``txt`` member, or a field of a
``json`` member. ``ddp-shards index`` records where (the manifest's ``label`` record), and the
loader reads labels through the same :class:`LabelReader`. That matters for exact epochs: a
sample the index did not count (no image, no label) must not be a position for the loader
either, so both call :meth:`LabelReader.usable` on the same grouped samples.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

# Sample members the loader decodes as the image; timm's ReaderWds looks for jpg;png;webp.
IMAGE_KEYS = ("jpg", "png", "webp", "jpeg")
INTEGER = re.compile(r"[+-]?\d+")
KINDS = ("index", "name")  # index: the label is the class number; name: a class name


class LabelError(ValueError):
    """A sample whose label member is missing or holds no usable label."""


@dataclass(frozen=True)
class LabelSpec:
    """The member holding a sample's label, and for JSON members the (dotted) field inside it."""

    member: str = "cls"
    field: str = ""  # '' = the member's whole text is the label

    @classmethod
    def parse(cls, text: str) -> "LabelSpec":
        """``cls``, ``txt``, ``json:label`` or ``json:meta.class`` -> a spec (ValueError if
        empty)."""
        member, _, field = text.strip().partition(":")
        member = member.strip().lower()
        if not member or (":" in text and not field.strip()):
            raise ValueError(f"--label-key {text!r}: give a member like cls, txt or json:FIELD")
        return cls(member, field.strip())

    def __str__(self) -> str:
        return f"{self.member}:{self.field}" if self.field else self.member


def has_image(raw: dict) -> bool:
    """True when the grouped sample holds an image member the loader can decode."""
    return any(k in raw for k in IMAGE_KEYS)


def raw_label(raw: dict, spec: LabelSpec) -> int | str:
    """The label value of a grouped sample: a class number (``cls`` text ``3``, a JSON int) or a
    class name (any other text, stripped).

    Raises :class:`LabelError` when the member or field is missing, empty, or not a number or a
    string (a float, a list, null).
    """
    if spec.member not in raw:
        raise LabelError(f"no {spec.member} member")
    data = raw[spec.member]
    if spec.field:
        try:
            value: Any = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise LabelError(f"{spec.member} is not JSON ({e})") from None
        for part in spec.field.split("."):  # dotted path into nested objects
            if not isinstance(value, dict) or part not in value:
                raise LabelError(f"{spec.member} has no field {spec.field!r}")
            value = value[part]
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise LabelError(f"{spec}: {value!r} is not a class number or name")
    else:
        try:
            value = data.decode("utf-8") if isinstance(data, bytes) else str(data)
        except UnicodeDecodeError:
            raise LabelError(f"{spec.member} is not UTF-8 text") from None
    if isinstance(value, str):
        value = value.strip()
        if not value:
            raise LabelError(f"{spec} is empty")
        # Only pack's convention reads digits as a class number: cls text ("3"). A txt member or
        # a JSON string is a name even when it is digits ("0042" keeps its zeros); JSON ints
        # are numbers.
        if spec.member == "cls" and not spec.field and INTEGER.fullmatch(value):
            value = int(value)
    if isinstance(value, int) and value < 0:
        raise LabelError(f"{spec}: negative class number {value}")
    return value


class LabelReader:
    """Maps grouped samples to class indices the way a manifest's ``label`` record says.

    ``record`` is ``{"member", "field", "kind"}`` (empty: pack's ``cls`` class numbers) and
    ``classes`` the class names in index order.
    """

    def __init__(self, record: dict | None, classes: list[str]) -> None:
        record = record or {}
        self.spec = LabelSpec(record.get("member", "cls"), record.get("field", ""))
        self.kind = record.get("kind", "index")
        if self.kind not in KINDS:
            raise ValueError(f"label kind must be one of {', '.join(KINDS)}, not {self.kind!r}")
        self.num_classes = len(classes)
        self.index = {name: i for i, name in enumerate(classes)}

    def __call__(self, raw: dict) -> int:
        """The class index of ``raw``; :class:`LabelError` when it has none."""
        value = raw_label(raw, self.spec)
        if self.kind == "index":
            if not isinstance(value, int) or value >= self.num_classes:
                raise LabelError(f"{self.spec}: {value!r} is not a class number below "
                                 f"{self.num_classes}")
            return value
        if str(value) not in self.index:
            raise LabelError(f"{self.spec}: {value!r} is not one of the dataset's classes")
        return self.index[str(value)]

    def usable(self, samples: Iterable[dict]) -> Iterator[dict]:
        """The samples that hold an image and a label, with ``__label__`` set to the index.

        The index counted exactly these, so positions in a shard are positions among them.
        """
        for raw in samples:
            if not has_image(raw):
                continue
            try:
                raw["__label__"] = self(raw)
            except LabelError:
                continue
            yield raw
