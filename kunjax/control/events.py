"""The overload decisions of a scheduler, as a bounded, time-stamped log (plain Python).

Each decision an overload policy carries out (a recompute preemption, a swap out or in, a
migration) is one `record()`: kind, request, bytes moved, tokens concerned, the copy's seconds,
Unix time. `Admin.Status` returns the entries after a sequence number, so a benchmark polling it
draws the server's event timeline without missing or repeating any. Sequence numbers come from one
process-wide counter, so the logs of several units merge by `seq` into one order.
"""

from __future__ import annotations

import collections
import itertools
import time
from typing import Iterable, Optional

_SEQ = itertools.count(1)


class EventLog:
    def __init__(self, maxlen: int = 10000, clock=time.time):
        self.clock = clock  # Unix time when serving; the simulator's clock in a simulation
        self._events: collections.deque[dict] = collections.deque(maxlen=maxlen)

    def record(self, kind: str, request_id: str = "", *, bytes: int = 0, tokens: int = 0, seconds: float = 0.0,
               target: int = -1) -> dict:
        ev = {"seq": next(_SEQ), "time": self.clock(), "kind": kind, "request_id": request_id, "bytes": int(bytes),
              "tokens": int(tokens), "seconds": float(seconds), "target": int(target)}
        self._events.append(ev)
        return ev

    def after(self, seq: int = 0) -> list[dict]:
        """Entries with a sequence number above `seq`, oldest first."""
        if not self._events or self._events[-1]["seq"] <= seq:
            return []
        return [e for e in self._events if e["seq"] > seq]

    def __len__(self) -> int:
        return len(self._events)


def merge(logs: Iterable[tuple[int, EventLog]], after: int = 0, limit: Optional[int] = None) -> list[dict]:
    """Entries of (instance, log) pairs after `after`, each tagged with its instance, in `seq` order
    (a log shared by several instances, e.g. a pipeline group's, is listed once)."""
    seen: set[int] = set()
    out = []
    for instance, log in logs:
        if id(log) in seen:
            continue
        seen.add(id(log))
        out += [{**e, "instance": instance} for e in log.after(after)]
    out.sort(key=lambda e: e["seq"])
    return out[-limit:] if limit else out
