"""The cache manager through hundreds of chunks: what is kept, in what order, with which positions, in how much room."""

import itertools

import numpy as np
import pytest

from runtime.context import Context, Round, Segment, Settings
from runtime.engine import SlotPool

SUFFIX = (2503,)
HEAD, PREV_CLOSE, OPEN, CLOSE, VISION = [1, 2], [3, 4], [5, 6], [7, 8], 9
GRID = (2, 3)


def user_tokens(i):
    return [100_000 + i, 100_001 + i]


def reply_tokens(i):
    n = 1 + i % 4  # replies of varying length; every other one ends with the trained " ..."
    return [200_000 + 10 * i + j for j in range(n)] + (list(SUFFIX) if i % 2 else [])


class Driver:
    """Feeds a Context chunk by chunk the way the commentator does, with slots from a real slot pool."""

    def __init__(self, settings, previous=(), query=(300, 301)):
        self.ctx = Context(settings, suffix=SUFFIX)
        self.pool = SlotPool(16, growable=True)
        self.query = list(query)
        self.ctx.head, self.ctx.previous = self.seg(HEAD), self.seg(previous)
        self.ctx.previous_close = self.seg(PREV_CLOSE)

    def seg(self, ids, kind="text", grid=None):
        return Segment(np.array(ids, np.int64), self.pool.allocate(len(ids)), grid, kind)

    def chunk(self, i):
        for slots in self.ctx.evict(i):
            self.pool.free(slots)
        if i and self.ctx.rounds[-1].index == i - 1 and not self.ctx.rounds[-1].folded:
            self.ctx.rounds[-1].close = self.seg(CLOSE)
        user = [self.seg(user_tokens(i)), self.seg([VISION] * 6, "vision", GRID)]
        if i == 0:
            user.append(self.seg(self.query, "query"))
        self.ctx.rounds.append(Round(i, user, self.seg(OPEN)))
        self.ctx.rounds[-1].reply = self.seg(reply_tokens(i))


def layout(i, s: Settings, previous=(), query=(300, 301)):
    """The retained sequence after chunk i, straight from the spec: user turns of the last max(window_size,
    text_round) chunks, verbatim replies of the last text_round, older replies (without " ...") in the
    previous text, trimmed to its first text_sink and last text_window tokens."""
    first_user = i - max(s.window_size, s.text_round) + 1
    first_verbatim = i - s.text_round + 1
    folded = [t for r in range(max(0, first_verbatim)) for t in reply_tokens(r)[: 1 + r % 4]]
    prev = list(previous) + folded
    if len(prev) > s.text_sink + s.text_window:
        prev = prev[: s.text_sink] + prev[len(prev) - s.text_window:]
    pinned = list(query) if s.keep_query and first_user > 0 else []
    out = HEAD + pinned + prev + PREV_CLOSE
    for r in range(max(0, first_user), i + 1):
        out += user_tokens(r) + [VISION] * 6 + (list(query) if r == 0 else [])
        if r >= first_verbatim:
            out += OPEN + reply_tokens(r) + (CLOSE if r < i else [])
    return out


SETTINGS = [Settings(16, 16, 512, 512), Settings(3, 5, 4, 6), Settings(6, 2, 3, 3), Settings(4, 4, 0, 5, True),
            Settings(2, 7, 10, 0)]


@pytest.mark.parametrize("s", SETTINGS, ids=lambda s: f"w{s.window_size}r{s.text_round}s{s.text_sink}t{s.text_window}")
def test_retained_layout_follows_the_spec_for_hundreds_of_chunks(s):
    previous = list(range(400, 420))
    driver = Driver(s, previous)
    sizes = []
    for i in range(700):
        driver.chunk(i)
        ctx = driver.ctx
        assert ctx.tokens().tolist() == layout(i, s, previous), f"chunk {i}"
        slots = ctx.slots()
        assert len(set(slots.tolist())) == len(slots) and driver.pool.live[slots].all()
        assert driver.pool.size == len(slots)  # every live slot belongs to a retained token: nothing leaks
        sizes.append(len(slots))
    bound = len(HEAD) + len(PREV_CLOSE) + 2 + s.text_sink + s.text_window + max(s.window_size, s.text_round) * 40
    assert max(sizes) <= bound and max(sizes[600:]) == max(sizes[500:600])  # bounded, and settled
    assert driver.pool.capacity <= 2 * max(sizes)


def test_user_turns_and_verbatim_replies_are_counted_in_chunks():
    s = Settings(window_size=3, text_round=5, text_sink=4, text_window=6)
    driver = Driver(s)
    for i in range(40):
        driver.chunk(i)
    ctx = driver.ctx
    with_user = [r.index for r in ctx.rounds if r.user]
    verbatim = [r.index for r in ctx.rounds if not r.folded]
    assert with_user == list(range(40 - 5, 40))  # max(window_size, text_round) user turns
    assert verbatim == list(range(40 - 5, 40))
    assert len(ctx.previous) == 4 + 6


def test_positions_are_contiguous_after_every_eviction():
    s = Settings(window_size=2, text_round=3, text_sink=2, text_window=3)
    driver = Driver(s)
    for i in range(50):
        driver.chunk(i)
        ctx = driver.ctx
        positions = ctx.positions()
        expect, pos = [], 0
        for segment in ctx.segments():
            if segment.grid:
                h, w = segment.grid
                for a, b in itertools.product(range(h), range(w)):
                    expect.append((pos, pos + a, pos + b))
                pos += max(h, w)
            else:
                expect += [(p, p, p) for p in range(pos, pos + len(segment))]
                pos += len(segment)
        assert positions.T.tolist() == [list(e) for e in expect]
        assert positions[0].max() == pos - 1  # no gaps: the last text token sits right after everything kept


def test_the_query_is_forgotten_unless_pinned():
    for keep in (False, True):
        driver = Driver(Settings(window_size=2, text_round=2, text_sink=8, text_window=8, keep_query=keep))
        for i in range(10):
            driver.chunk(i)
        tokens = driver.ctx.tokens().tolist()
        assert (tokens[2:4] == [300, 301]) is keep  # pinned right after the head
        assert tokens.count(300) == int(keep)


def test_folded_replies_lose_only_the_trained_suffix():
    driver = Driver(Settings(window_size=2, text_round=2, text_sink=100, text_window=100))
    for i in range(8):
        driver.chunk(i)
    folded = [t for r in range(7 - 2 + 1) for t in reply_tokens(r)[: 1 + r % 4]]
    assert driver.ctx.previous.tokens.tolist() == folded
    assert SUFFIX[0] not in driver.ctx.previous.tokens
