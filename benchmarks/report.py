"""The benchmarks' common ending: run the measurement with library chatter sent to stderr, and
print the result as the only JSON on stdout."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable
from typing import Any


def print_report(measure: Callable[..., dict[str, Any]], *args: Any) -> None:
    """`measure(*args)` with stdout redirected to stderr (DeepSpeed's accelerator probe and
    other libraries print there), then its result as indented JSON on stdout."""
    with contextlib.redirect_stdout(sys.stderr):
        result = measure(*args)
    print(json.dumps(result, indent=2))
