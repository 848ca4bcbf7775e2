"""Option groups: flat ``tikmix_*`` dataclass fields, each declaring the check of its own value.

A group is a dataclass of command-line flags. ``HfArgumentParser`` reads each field's type, default
and ``metadata["help"]``; the check rides in the annotation, with ``typing.Annotated``::

    @dataclass
    class DoGEOptions(OptionGroup):
        tikmix_doge_eta: Annotated[float, number(above=0)] = option(1.0, "doge: step size of ...")

(Not in ``metadata``: ``HfArgumentParser`` hands every metadata entry to ``argparse.add_argument``,
which refuses unknown keywords, while the ``typing.get_type_hints`` it calls drops ``Annotated``
extras.) Building a group runs :func:`check_options`: every field's :class:`Check`, then the rules
between fields that each group states in :meth:`OptionGroup.check_rules`. A bad value raises
``ValueError("<field>=<value>: <fix>")``, naming the field, the value and what to give instead.

:class:`~tikmix_hf.TiKMiXConfig` is composed of groups by inheritance, which keeps its fields flat:
the callback's own groups (``config.py``) and each mixer's (declared beside the mixer and registered
with it, :func:`tikmix_hf.mixers.register`).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import typing
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

from .validation import Range, format_value

__all__ = [
    "Check", "OptionGroup", "check_options", "choice", "custom", "declared_checks", "fail", "flag", "integer",
    "number", "numbers", "option", "path", "text",
]

_T = TypeVar("_T")


def fail(name: str, value: Any, fix: str) -> NoReturn:
    """Raise the options' ``ValueError``: ``<name>=<value>: <fix>``."""
    raise ValueError(f"{name}={format_value(value)}: {fix}")


@dataclasses.dataclass(frozen=True)
class Check:
    """How the value of one option is checked; build one with :func:`number`, :func:`integer`, :func:`flag`,
    :func:`choice`, :func:`text`, :func:`path`, :func:`numbers` or :func:`custom`.

    ``kind`` says what the value is; ``rule`` bounds a number (or each number of a list); ``optional``
    lets ``None`` (unset) pass; ``fix`` is what the error tells the user to do.
    """

    kind: str  # number | integer | flag | choice | text | path | numbers | custom
    fix: str
    rule: Range = Range()  # number, integer, numbers: the bounds; any finite number unless given
    optional: bool = False
    choices: tuple | Callable[[], tuple] = ()
    test: Callable[[str, Any], None] | None = None  # custom: raises ValueError naming the field

    def options(self) -> tuple:
        """The allowed values of a ``choice`` (a callable is asked now, so a registry can grow)."""
        return tuple(self.choices()) if callable(self.choices) else tuple(self.choices)

    def passes(self, value: Any) -> bool:
        """Whether ``value`` is acceptable (a ``custom`` check is run by :meth:`__call__` only)."""
        if value is None:
            return self.optional
        kind = self.kind
        if kind == "number":
            return isinstance(value, (int, float)) and self.rule.holds(value)
        if kind == "integer":
            return isinstance(value, int) and self.rule.holds(value)
        if kind == "flag":
            return isinstance(value, bool)
        if kind == "choice":
            return any(type(value) is type(c) and value == c for c in self.options())
        if kind == "text":
            return isinstance(value, str) and bool(value)
        if kind == "path":
            return isinstance(value, (str, os.PathLike)) and bool(os.fspath(value))
        if kind == "numbers":
            return (isinstance(value, (list, tuple)) and len(value) > 0
                    and all(isinstance(v, (int, float)) and self.rule.holds(v) for v in value)
                    and all(a < b for a, b in itertools.pairwise(value)))
        raise AssertionError(f"unknown kind of check {kind!r}")

    def __call__(self, name: str, value: Any) -> None:
        """Raise ``ValueError`` naming ``name``, ``value`` and the fix unless the value passes."""
        if self.kind == "custom":
            if self.test is not None and (value is not None or not self.optional):
                self.test(name, value)
        elif not self.passes(value):
            fail(name, value, self.fix or f"use one of {self.options()}")


def _fix(requirement: str, fix: str | None, optional: bool) -> str:
    return fix if fix is not None else f"must be {requirement}" + (" (or unset)" if optional else "")


def _bounds(above: float | None, at_least: float | None, below: float | None, at_most: float | None,
            integer: bool = False) -> Range:
    if above is not None and at_least is not None or below is not None and at_most is not None:
        raise TypeError("give at most one lower bound (above, at_least) and one upper bound (below, at_most)")
    low, high = (above if above is not None else at_least), (below if below is not None else at_most)
    return Range(low, high, low_open=above is not None, high_open=below is not None, integer=integer)


def number(*, above: float | None = None, at_least: float | None = None, below: float | None = None,
           at_most: float | None = None, optional: bool = False, fix: str | None = None) -> Check:
    """A finite number (an ``int`` or a ``float``, never a bool) within the bounds given."""
    rule = _bounds(above, at_least, below, at_most)
    return Check("number", _fix(rule.describe(), fix, optional), rule, optional)


def integer(*, at_least: int | None = None, optional: bool = False, fix: str | None = None) -> Check:
    """An ``int`` (never a bool), at least ``at_least``."""
    rule = Range(low=at_least, integer=True)
    named: dict[int | None, str] = {1: "a positive integer", 0: "a non-negative integer"}
    words = named.get(at_least, rule.describe())
    return Check("integer", _fix(words, fix, optional), rule, optional)


def flag() -> Check:
    """``True`` or ``False``."""
    return Check("flag", "must be True or False")


def choice(choices: tuple | Callable[[], tuple], *, fix: str | None = None) -> Check:
    """One of ``choices``: a tuple, or a callable giving it (checked against its answer at the time)."""
    return Check("choice", fix or "", choices=choices)


def text(*, optional: bool = False, fix: str | None = None) -> Check:
    """A non-empty string."""
    return Check("text", _fix("a non-empty string", fix, optional), optional=optional)


def path(*, optional: bool = False, fix: str | None = None) -> Check:
    """The path of a file: a non-empty string or ``os.PathLike``."""
    return Check("path", _fix("a path", fix, optional), optional=optional)


def numbers(*, above: float | None = None, at_least: float | None = None, below: float | None = None,
            at_most: float | None = None, optional: bool = False, fix: str | None = None) -> Check:
    """A non-empty, strictly increasing list (or tuple) of numbers, each within the bounds given."""
    rule = _bounds(above, at_least, below, at_most)
    return Check("numbers", _fix(f"an increasing list of {rule.describe()}s", fix, optional), rule, optional)


def custom(test: Callable[[str, Any], None], *, optional: bool = False) -> Check:
    """A check written as code: ``test(name, value)`` raises ``ValueError`` naming the field (see :func:`fail`)."""
    return Check("custom", "", optional=optional, test=test)


def option(default: _T, help: str) -> _T:
    """A field of an option group: its default and its ``--help`` text (``%`` escaped for argparse).

    Typed as its default, as :func:`dataclasses.field` is, so that ``x: float = option(1.0, ...)`` checks.
    """
    return dataclasses.field(default=default, metadata={"help": help.replace("%", "%%")})


@dataclasses.dataclass
class OptionGroup:
    """Base of the option groups: building one checks it (:func:`check_options`)."""

    def __post_init__(self) -> None:
        check_options(self)

    def check_rules(self) -> None:
        """The rules between this group's own fields (its fields' own checks have passed); raise with :func:`fail`.

        Every group in a class's bases has its ``check_rules`` run, bases first, so a group states
        only its own rules and need not call ``super()``.
        """

    @classmethod
    def from_config(cls: type[_G], config: Any) -> _G:
        """This group with the values of ``config``'s fields of the same names (defaults for those it lacks)."""
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{name: getattr(config, name) for name in names if hasattr(config, name)})

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


_G = TypeVar("_G", bound=OptionGroup)


@functools.cache
def declared_checks(cls: type) -> dict[str, Check]:
    """Field name -> :class:`Check`, from the ``Annotated`` fields of every option group among ``cls``'s bases."""
    out: dict[str, Check] = {}
    for base in reversed(cls.__mro__):
        if base is OptionGroup or not (isinstance(base, type) and issubclass(base, OptionGroup)):
            continue
        for name, hint in typing.get_type_hints(base, include_extras=True).items():
            declared = [x for x in getattr(hint, "__metadata__", ()) if isinstance(x, Check)]
            if declared:
                out[name] = declared[0]
    return out


def check_options(obj: OptionGroup) -> None:
    """Run every declared check of ``obj``'s fields, then the :meth:`~OptionGroup.check_rules` of each of its
    option groups (bases first), so that a rule between fields only ever sees values of the right kind."""
    # A class is hashable; mypy reads the unhashable dataclass instances' __hash__ (None) off type[OptionGroup].
    for name, check in declared_checks(type(obj)).items():  # type: ignore[arg-type]
        check(name, getattr(obj, name))
    for cls in reversed(type(obj).__mro__):
        rules = cls.__dict__.get("check_rules")
        if rules is not None:
            rules(obj)
