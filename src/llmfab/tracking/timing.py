"""Where a stage's wall time goes: optimizer steps, sampling, scoring forward passes, and the rest.

Compute sections are marked with `timed(kind)`; nested sections charge the innermost kind only (a
generation inside an evaluation is generation), so the kinds add up to at most the wall time. The
stage runner logs what each kind gained during the stage as `time_<kind>_s` next to
`stage_seconds`; everything else in `stage_seconds` (loading, tokenizing, checkpoints, tracking) is
the stage's overhead, which the orchestration benchmark reports.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

KINDS = ("train", "generate", "score")  # optimizer steps; sampling; forward passes outside training
_totals: dict[str, float] = dict.fromkeys(KINDS, 0.0)
_open: list[list] = []  # [kind, since] of the sections entered and not yet left, innermost last


@contextmanager
def timed(kind: str) -> Iterator[None]:
    """A section of `kind`; also a decorator (`@timed("score")`), timing each call."""
    if kind not in _totals:
        raise ValueError(f"unknown timing kind {kind!r}; one of {', '.join(KINDS)}")
    now = time.perf_counter()
    if _open:  # pause the enclosing section while this one runs
        _totals[_open[-1][0]] += now - _open[-1][1]
    _open.append([kind, now])
    try:
        yield
    finally:
        kind, since = _open.pop()
        now = time.perf_counter()
        _totals[kind] += now - since
        if _open:
            _open[-1][1] = now


def totals() -> dict[str, float]:
    """Seconds per kind since the process started (sections still open are counted up to now)."""
    out = dict(_totals)
    if _open:
        out[_open[-1][0]] += time.perf_counter() - _open[-1][1]
    return out
