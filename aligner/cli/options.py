"""Range checks of command-line options: a value no command can use (``--n 0``, a NaN
weight) is one ``aligner <command>: error: ...`` line (a :class:`aligner.runtime.UserError`)
before any model is loaded, instead of an empty output or a traceback later."""
from __future__ import annotations

import math
from typing import Optional

from aligner.runtime import UserError


def at_least(option: str, value: Optional[int], minimum: int, why: str = "") -> None:
    """``value`` (None: not given) is an integer >= ``minimum``; ``why`` says what needs it."""
    if value is not None and value < minimum:
        raise UserError(f"{option} {value}: expected an integer >= {minimum}" + (f" ({why})" if why else ""))


def finite(option: str, value: Optional[float], minimum: Optional[float] = None) -> None:
    """``value`` (None: not given) is a finite number, >= ``minimum`` when one is given."""
    if value is None:
        return
    if not math.isfinite(value) or (minimum is not None and value < minimum):
        raise UserError(f"{option} {value}: expected a finite number" + (f" >= {minimum}" if minimum is not None
                                                                           else ""))
