"""The page pool: the KV cache's pages, who holds them, and which prompt prefixes they already hold (NumPy only).

A page holds the keys and values of `page_size` consecutive positions of one request. Layers fall into groups by
their attention window (`windows`, one per group; None is full attention). Each request holds one page table per
group: a contiguous run of logical pages `first, first + 1, ...` (position p lives on logical page p // page_size at
offset p % page_size). A full-attention group's table starts at page 0 and grows as the request decodes; a windowed
group also drops the pages wholly outside its window, so while decoding it never holds more than
ceil(window / page_size) + 1 pages. All groups draw page ids from this one pool: the device keeps one buffer per
layer index within a group, [num_pages, page_size, kv_heads, head_dim], and a page id means "this group's layers"
(the hybrid layout of vLLM's KV manager: no memory is lost when the groups have equal numbers of layers).

Prefix caching: once a full page's K/V is written (`commit`), it is keyed by a hash chain of the tokens up to its
end (and an optional adapter key), per group. A new request reuses the longest prefix whose pages are cached (a
windowed group needs only the pages its window still reads). Pages are reference counted; a cached page nobody
holds stays cached and is evicted least recently used first when the pool runs short. Everything here is
deterministic (no Python `hash`, no clocks), so every process of a multi-host server allocates alike.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from collections.abc import Sequence

import numpy as np

from mistral_jax.serving.requests import RequestError


@dataclasses.dataclass(frozen=True)
class PageTable:
    """One request's pages for one layer group: logical pages first, first + 1, ... in order."""

    first: int  # logical page number of pages[0] (> 0 once a window dropped the pages before it)
    pages: tuple[int, ...]  # page ids

    @property
    def end(self) -> int:
        """One past the last logical page held."""
        return self.first + len(self.pages)


@dataclasses.dataclass
class _Holding:
    """What one request holds: its tables, its hash chain so far and how many of its pages are keyed."""

    tables: list[PageTable]
    chain: list[bytes]  # chain[j]: the key of logical page j (hash of the tokens up to its end)
    adapter: str | None
    keyed: int = 0  # pages 0 .. keyed-1 are offered to the prefix cache (or were hits)


def chain_keys(tokens: Sequence[int], page_size: int, adapter: str | None = None, start: bytes | None = None,
               skip: int = 0) -> list[bytes]:
    """Hash-chain keys of the full pages of `tokens` after the first `skip` (whose last key is `start`)."""
    previous = start if start is not None else hashlib.blake2b(
        b"adapter:" + (adapter or "").encode(), digest_size=16).digest()
    keys = []
    for j in range(skip, len(tokens) // page_size):
        page = np.asarray(tokens[j * page_size:(j + 1) * page_size], dtype=np.int64).tobytes()
        previous = hashlib.blake2b(previous + page, digest_size=16).digest()
        keys.append(previous)
    return keys


class PagePool:
    """Page allocation, per-request page tables, window freeing and the prefix cache (see the module docstring)."""

    def __init__(self, num_pages: int, page_size: int, windows: Sequence[int | None] = (None,)) -> None:
        if page_size < 1:
            raise RequestError("page_size", f"page_size must be positive, got {page_size}")
        if num_pages < 1:
            raise RequestError("max_total_tokens", f"the pool needs at least one page of {page_size} tokens")
        if not windows or any(w is not None and w < 1 for w in windows):
            raise RequestError("windows", f"one window per layer group, each positive or None, got {windows}")
        self.num_pages, self.page_size, self.windows = num_pages, page_size, tuple(windows)
        self._free: collections.deque[int] = collections.deque(range(num_pages))  # never cached or evicted
        self._refs = np.zeros(num_pages, np.int64)
        self._key_of: dict[int, tuple[int, bytes]] = {}  # page -> (group, chain key) of a cached page
        self._page_of: dict[tuple[int, bytes], int] = {}
        self._idle: collections.OrderedDict[int, None] = collections.OrderedDict()  # cached, unheld; oldest first
        self._held: dict[int, _Holding] = {}

    @classmethod
    def from_tokens(cls, max_total_tokens: int, page_size: int, windows: Sequence[int | None] = (None,)) -> PagePool:
        """A pool of max_total_tokens // page_size pages (SGLang's --max-total-tokens: capacity across requests)."""
        if max_total_tokens < page_size:
            raise RequestError("max_total_tokens", f"max_total_tokens ({max_total_tokens}) must hold at least one "
                                                   f"page of page_size {page_size} tokens")
        return cls(max_total_tokens // page_size, page_size, windows)

    # Counts ---------------------------------------------------------------------------------------
    @property
    def capacity_tokens(self) -> int:
        return self.num_pages * self.page_size

    @property
    def num_free(self) -> int:
        """Pages a request could take now: never used, plus cached pages nobody holds (evictable)."""
        return len(self._free) + len(self._idle)

    @property
    def num_used(self) -> int:
        """Pages some request holds (the metric mistral_jax_kv_pages_used)."""
        return self.num_pages - self.num_free

    @property
    def num_cached(self) -> int:
        return len(self._key_of)

    def refcount(self, page: int) -> int:
        return int(self._refs[page])

    def holds(self, request_id: int) -> bool:
        return request_id in self._held

    def table(self, request_id: int, group: int = 0) -> PageTable:
        return self._held[request_id].tables[group]

    # Sizing ---------------------------------------------------------------------------------------
    def pages_for(self, tokens: int, chunk: int = 1) -> int:
        """Most pages one request holds at once, over all groups, to hold `tokens` tokens computed `chunk` at a time."""
        full = -(-tokens // self.page_size)
        total = 0
        for window in self.windows:
            # a step computing positions [s, s + chunk) reads from s - window + 1: at most this many pages
            span = full if window is None else -(-(window - 1 + chunk) // self.page_size) + 1
            total += min(full, span)
        return total

    def check_fits(self, prompt_tokens: int, max_tokens: int, prompt_param: str = "prompt") -> None:
        """Refuse (RequestError naming the field) a request that could never fit in the pool, even alone.

        The cache holds at most prompt + max_tokens - 1 tokens (the last sampled token is never fed back).
        """
        need = self.pages_for(prompt_tokens)
        if need > self.num_pages:
            raise RequestError(prompt_param, f"the prompt's {prompt_tokens} tokens need {need} "
                                             f"KV pages; the pool holds {self.num_pages} pages "
                                             f"({self.capacity_tokens} tokens, --max-total-tokens)")
        need = self.pages_for(prompt_tokens + max_tokens - 1)
        if need > self.num_pages:
            raise RequestError("max_tokens", f"the prompt's {prompt_tokens} tokens plus max_tokens {max_tokens} need "
                                             f"{need} KV pages; the pool holds {self.num_pages} pages "
                                             f"({self.capacity_tokens} tokens, --max-total-tokens)")

    # Requests -------------------------------------------------------------------------------------
    def open(self, request_id: int, tokens: Sequence[int], adapter: str | None = None) -> int:
        """Start holding pages for a request whose sequence is `tokens`; returns how many leading tokens are
        already cached (a multiple of page_size, at most len(tokens) - 1, so the last token is always computed).

        The hit's pages are shared (their refcounts rise); call `reserve` before computing the rest.
        """
        if request_id in self._held:
            raise ValueError(f"request {request_id} already holds pages")
        ps = self.page_size
        keys = chain_keys(tokens, ps, adapter)
        hit = self._longest_hit(keys, (len(tokens) - 1) // ps)
        tables = []
        for group in range(len(self.windows)):
            first = self._first_read(group, hit * ps)  # a window reads only the last pages of the hit
            pages = [self._page_of[(group, keys[j])] for j in range(first, hit)]
            for page in pages:
                self._take(page)
            tables.append(PageTable(first, tuple(pages)))
        self._held[request_id] = _Holding(tables, keys, adapter, hit)
        return hit * ps

    def _longest_hit(self, keys: list[bytes], most: int) -> int:
        """Largest n <= most whose first n pages every group has cached as far as it reads them from position n * ps."""
        most = min(most, len(keys))
        for group, window in enumerate(self.windows):  # a full group needs an unbroken run from page 0
            if window is None:
                run = 0
                while run < most and (group, keys[run]) in self._page_of:
                    run += 1
                most = run
        for n in range(most, 0, -1):
            if all((group, keys[j]) in self._page_of for group, window in enumerate(self.windows) if window is not None
                   for j in range(self._first_read(group, n * self.page_size), n)):
                return n
        return 0

    def _first_read(self, group: int, position: int) -> int:
        """The first logical page a query at `position` (or later) of `group` reads."""
        window = self.windows[group]
        return 0 if window is None else max(0, position - window + 1) // self.page_size

    def reserve(self, request_id: int, start: int, end: int) -> bool:
        """Make the request's tables cover positions [start, end) for a step that computes them.

        Windowed groups first drop the pages no query at `start` or later reads. Returns False, taking no new
        pages, when the pool (free plus evictable pages) is too short; the caller preempts someone and retries.
        """
        holding = self._held[request_id]
        for group, table in enumerate(holding.tables):
            keep_from, dropped = self._first_read(group, start), 0
            while dropped < len(table.pages) and table.first + dropped < keep_from:
                self._give(table.pages[dropped])
                dropped += 1
            first = max(table.first, keep_from) if dropped == len(table.pages) else table.first + dropped
            holding.tables[group] = PageTable(first, table.pages[dropped:])
        last = -(-end // self.page_size)  # one past the last logical page the step writes
        need = sum(max(0, last - table.end) for table in holding.tables)
        if need > self.num_free:
            return False
        for group, table in enumerate(holding.tables):
            new = tuple(self._allocate() for _ in range(table.end, last))
            holding.tables[group] = PageTable(table.first, table.pages + new)
        return True

    def commit(self, request_id: int, tokens: Sequence[int]) -> int:
        """`tokens` (the request's sequence from position 0) now have their K/V written: offer its full pages to the
        prefix cache. Returns how many pages became cached."""
        holding = self._held[request_id]
        full = len(tokens) // self.page_size
        if full <= holding.keyed:
            return 0
        if len(holding.chain) < full:
            start = holding.chain[-1] if holding.chain else None
            holding.chain += chain_keys(tokens, self.page_size, holding.adapter, start, skip=len(holding.chain))
        added = 0
        for j in range(holding.keyed, full):
            for group, table in enumerate(holding.tables):
                if table.first <= j < table.end:
                    added += self._offer(table.pages[j - table.first], (group, holding.chain[j]))
        holding.keyed = full
        return added

    def release(self, request_id: int) -> None:
        """The request finished, was cancelled or preempted: give back all its pages (cached ones stay cached)."""
        holding = self._held.pop(request_id)
        for table in holding.tables:
            for page in reversed(table.pages):  # a chain's tail ages first, so it is evicted before its head
                self._give(page)

    def slots(self, request_id: int, start: int, end: int, group: int = 0) -> np.ndarray:
        """int32 [end - start]: the flat cache slot (page * page_size + offset) of positions start .. end - 1."""
        table = self._held[request_id].tables[group]
        positions = np.arange(start, end)
        logical = positions // self.page_size - table.first
        if start < end and (logical.min() < 0 or logical.max() >= len(table.pages)):
            raise ValueError(f"positions {start}..{end - 1} are outside request {request_id}'s pages")
        pages = np.asarray(table.pages, np.int64)[logical] if start < end else np.zeros(0, np.int64)
        return (pages * self.page_size + positions % self.page_size).astype(np.int32)

    # Pages ----------------------------------------------------------------------------------------
    def _take(self, page: int) -> None:
        if self._refs[page] == 0:
            self._idle.pop(page, None)
        self._refs[page] += 1

    def _give(self, page: int) -> None:
        self._refs[page] -= 1
        if self._refs[page] < 0:
            raise AssertionError(f"page {page} released more often than taken")
        if self._refs[page] == 0:
            if page in self._key_of:
                self._idle[page] = None  # most recently used last
            else:
                self._free.append(page)

    def _allocate(self) -> int:
        if self._free:
            page = self._free.popleft()
        else:
            page, _ = self._idle.popitem(last=False)  # evict the least recently used cached page
            del self._page_of[self._key_of.pop(page)]
        self._refs[page] = 1
        return page

    def _offer(self, page: int, key: tuple[int, bytes]) -> int:
        """Key a held page in the prefix cache (unless that key already names another page)."""
        if key in self._page_of or page in self._key_of:
            return 0
        self._page_of[key], self._key_of[page] = page, key
        return 1

    def evictable(self) -> list[int]:
        """Cached pages nobody holds, in eviction order (least recently used first)."""
        return list(self._idle)
