"""Page accounting: the one owner of every KV page decision of a step unit (plain Python).

A page id names the same slot range in every layer's pool of the unit. Page 0 is the null page that
no request owns: padded token slots of a step write there, which keeps every step's shapes static.
A pipeline group serves one page-id space across its stages (each stage holds its own layers' KV at
those ids), so the allocator knows nothing of layers or devices.
"""

from __future__ import annotations

import collections
from typing import Iterable, Sequence

NULL_PAGE = 0


class OutOfPages(Exception):
    pass


def pages_for(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)


class PageAllocator:
    """Free list of page ids 1..num_pages-1. Allocation failure is explicit, never a garbage page.

    `used` marks pages that are taken from the start: a pipeline group is born with the pages its
    members' running requests already hold (renumbered into the group's space). `reserved` pages are
    never handed out nor counted as usable (a group keeps each member's null page at its offset)."""

    def __init__(self, num_pages: int, used: Iterable[int] = (), reserved: Iterable[int] = ()):
        if num_pages < 2:
            raise ValueError(f"need at least 2 pages (one is the null page), got {num_pages}")
        self.num_pages = num_pages
        self.reserved = frozenset(reserved)
        self._used: set[int] = set(self.reserved)
        for p in used:
            if not 0 < p < num_pages or p in self._used:
                raise ValueError(f"page {p} cannot be marked used in a space of {num_pages} pages")
            self._used.add(p)
        self._free: collections.deque[int] = collections.deque(p for p in range(1, num_pages) if p not in self._used)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_usable(self) -> int:
        return self.num_pages - 1 - len(self.reserved)

    @property
    def num_used(self) -> int:
        return len(self._used) - len(self.reserved)

    def is_used(self, page: int) -> bool:
        return page in self._used

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfPages(f"asked for {n} pages, {len(self._free)} free")
        pages = [self._free.popleft() for _ in range(n)]
        self._used.update(pages)
        return pages

    def free(self, pages: Sequence[int]) -> None:
        for p in pages:
            if p not in self._used or p in self.reserved:
                raise ValueError(f"page {p} freed twice or never allocated")
            self._used.remove(p)
            self._free.append(p)
