"""`frozen`: a frozen dataclass that is as cheap to build as a plain one.

A frozen dataclass's generated ``__init__`` sets each field through ``object.__setattr__``, one
call per field, which costs three to four times a plain instance's. The messages built for every
call the scheduler routes (a `CallSpec` has 14 fields) made that about 7% of the simulator's
time. `frozen` keeps everything `dataclass(frozen=True)` gives (no assignment, equality,
hashing, repr) and swaps in an ``__init__`` that writes the instance's dict in one go.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

T = TypeVar("T")

if TYPE_CHECKING:  # what type checkers read, for 3.10 too (typing_extensions ships with them)
    from typing_extensions import dataclass_transform
elif sys.version_info >= (3, 11):
    from typing import dataclass_transform
else:  # pragma: no cover - 3.10: the same at run time

    def dataclass_transform(**_: Any) -> Callable[[T], T]:
        return lambda f: f


@dataclass_transform(frozen_default=True)
def frozen(cls: type[T]) -> type[T]:
    """``@dataclass(frozen=True)`` with a fast ``__init__`` (same signature and defaults).

    Only for what that ``__init__`` can express: fields all in ``__init__``, positional or by
    keyword, no ``InitVar``, no ``__slots__``; ``__post_init__`` still runs."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    if any(not f.init or f.kw_only for f in fields) or "__slots__" in cls.__dict__:
        raise TypeError(f"{cls.__name__}: frozen() takes plain fields only")
    scope: dict[str, Any] = {"_MISSING": dataclasses.MISSING}
    params, fill = [], []
    for f in fields:
        if f.default is not dataclasses.MISSING:
            scope[f"_d_{f.name}"] = f.default
            params.append(f"{f.name}=_d_{f.name}")
        elif f.default_factory is not dataclasses.MISSING:
            scope[f"_f_{f.name}"] = f.default_factory
            params.append(f"{f.name}=_MISSING")
            fill.append(f"    if {f.name} is _MISSING: {f.name} = _f_{f.name}()")
        else:
            params.append(f.name)
    store = ", ".join(f"{f.name}={f.name}" for f in fields)
    lines = [
        f"def __init__(self, {', '.join(params)}):",
        *fill,
        f"    self.__dict__.update({store})",
    ]
    if hasattr(cls, "__post_init__"):
        lines.append("    self.__post_init__()")
    exec("\n".join(lines), scope)
    init = scope["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__doc__ = cls.__init__.__doc__
    cls.__init__ = init  # type: ignore[method-assign]
    return cls
