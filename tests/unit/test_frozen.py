"""`frozen` must behave exactly as ``dataclass(frozen=True)`` does, only build faster."""

from __future__ import annotations

import dataclasses

import pytest

from swarmx.frozen import frozen


@frozen
class Point:
    x: int
    y: int = 2
    tags: list[str] = dataclasses.field(default_factory=list)


@frozen
class Checked:
    n: int

    def __post_init__(self) -> None:
        if self.n < 0:
            raise ValueError("negative")


def test_positional_keyword_and_defaults() -> None:
    assert Point(1) == Point(x=1, y=2)
    assert Point(1, 3).y == 3
    assert Point(1, tags=["a"]).tags == ["a"]


def test_default_factory_gives_each_instance_its_own() -> None:
    a, b = Point(1), Point(1)
    assert a.tags == [] and a.tags is not b.tags


def test_assignment_is_refused_and_equal_instances_hash_alike() -> None:
    p = Point(1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.x = 5  # type: ignore[misc]
    assert repr(Point(1)) == "Point(x=1, y=2, tags=[])"
    assert hash(Checked(3)) == hash(Checked(3)) and len({Checked(3), Checked(3)}) == 1
    assert dataclasses.replace(Point(1), y=9) == Point(1, 9)


def test_post_init_still_runs() -> None:
    with pytest.raises(ValueError, match="negative"):
        Checked(-1)
    assert Checked(3).n == 3


def test_missing_argument_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        Point()  # type: ignore[call-arg]


def test_fields_it_cannot_express_are_refused() -> None:
    with pytest.raises(TypeError, match="plain fields only"):

        @frozen
        class KwOnly:
            a: int = dataclasses.field(kw_only=True, default=0)
