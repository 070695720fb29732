"""The one Registry type that every plug-in family uses."""

from __future__ import annotations

import pytest

from advedge.errors import UsageError
from advedge.registry import Registry


def test_entries_keep_registration_order_and_docstring_descriptions() -> None:
    reg: Registry[type] = Registry("widget")

    @reg.register("b")
    class B:
        """The b widget.

        More text that is not the description.
        """

    reg.register("a", int, description="plain ints")
    assert list(reg) == ["b", "a"] == reg.names()
    assert reg["b"] is B and reg.get("a") is int
    assert reg.description("b") == "The b widget."
    assert reg.description("a") == "plain ints"
    assert reg.choices() == "b|a" and len(reg) == 2 and "a" in reg and "c" not in reg


def test_unknown_names_fail_in_one_line_with_a_suggestion() -> None:
    reg: Registry[int] = Registry("widget")
    reg.register("square", 1)
    with pytest.raises(UsageError, match=r"unknown widget 'sqare'") as info:
        reg.get("sqare")
    assert "square" in str(info.value.hint)
    with pytest.raises(UsageError, match="unknown widget"):
        reg.get(["not", "hashable"])  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        reg.description("nope")


def test_a_name_registers_once_and_copies_are_independent() -> None:
    reg: Registry[int] = Registry("widget")
    reg.register("x", 1)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("x", 2)
    copy = reg.copy()
    copy.register("y", 2)
    assert "y" in copy and "y" not in reg and copy.description("x") == reg.description("x")
