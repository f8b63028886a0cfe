"""The cache manager through hundreds of chunks: what is kept, in what order, with which positions, in how much room."""

import itertools

import numpy as np
import pytest

from runtime.context import Context, Round, Segment, Settings
from runtime.engine import SlotPool

SUFFIX = (2503,)
HEAD, PREV_CLOSE, OPEN, CLOSE, USER, USER_END = [1, 2], [3, 4], [5, 6], [7, 8], [10, 11], [12]
VISION_START, VISION, VISION_END = 13, 9, 14
GRID = (2, 3)


def time_tokens(i):
    return [100_000 + i, 100_001 + i]


def vision_tokens():
    return [VISION_START] + [VISION] * 6 + [VISION_END]


def reply_tokens(i):
    n = 1 + i % 4  # replies of varying length; every other one ends with the trained " ..."
    return [200_000 + 10 * i + j for j in range(n)] + (list(SUFFIX) if i % 2 else [])


class Driver:
    """Feeds a Context chunk by chunk the way the commentator does, with slots from a real slot pool."""

    def __init__(self, settings, previous=(), query=(300, 301), reply=reply_tokens):
        self.ctx = Context(settings, suffix=SUFFIX)
        self.pool = SlotPool(16, growable=True)
        self.query, self.reply = list(query), reply
        self.ctx.head, self.ctx.previous = self.seg(HEAD), self.seg(previous)
        self.ctx.previous_close = self.seg(PREV_CLOSE)

    def seg(self, ids, kind="text", grid=None):
        return Segment(np.array(ids, np.int64), self.pool.allocate(len(ids)), grid, kind)

    def chunk(self, i):
        for slots in self.ctx.evict(i):
            self.pool.free(slots)
        if i and self.ctx.rounds[-1].index == i - 1 and not self.ctx.rounds[-1].folded:
            self.ctx.rounds[-1].close = self.seg(CLOSE)
        user = [self.seg(USER), self.seg(time_tokens(i), "time"), self.seg([VISION_START], "vision"),
                self.seg([VISION] * 6, "vision", GRID), self.seg([VISION_END], "vision")]
        if i == 0:
            user.append(self.seg(self.query, "query"))
        user.append(self.seg(USER_END))
        self.ctx.rounds.append(Round(i, user, self.seg(OPEN)))
        self.ctx.rounds[-1].reply = self.seg(self.reply(i))


def layout(i, s: Settings, previous=(), query=(300, 301)):
    """The retained sequence after chunk i, straight from the spec: user turns of the last max(window_size,
    text_round) chunks, of which the last window_size keep their vision block and the last text_round their
    Time= text (when the vision window is the larger; else all keep it); verbatim replies of the last text_round,
    older replies (without " ...") in the previous text, trimmed to its first text_sink and last text_window
    tokens."""
    w, t = s.window_size, s.text_round
    first_user = i - max(w, t) + 1
    first_verbatim = i - t + 1
    first_vision = i - w + 1
    folded = [tok for r in range(max(0, first_verbatim)) for tok in reply_tokens(r)[: 1 + r % 4]]
    prev = list(previous) + folded
    if len(prev) > s.text_sink + s.text_window:
        prev = prev[: s.text_sink] + prev[len(prev) - s.text_window:]
    pinned = list(query) if s.keep_query and first_user > 0 else []
    out = HEAD + pinned + prev + PREV_CLOSE
    for r in range(max(0, first_user), i + 1):
        out += USER
        if w <= t or r >= first_verbatim:
            out += time_tokens(r)
        if r >= first_vision:
            out += vision_tokens()
        out += (list(query) if r == 0 else []) + USER_END
        if r >= first_verbatim:
            out += OPEN + reply_tokens(r) + (CLOSE if r < i else [])
    return out


SETTINGS = [Settings(16, 16, 512, 512), Settings(3, 5, 4, 6), Settings(6, 2, 3, 3), Settings(4, 4, 0, 5, True),
            Settings(2, 7, 10, 0), Settings(7, 3, 5, 5, True), Settings(1, 9, 2, 2), Settings(9, 2, 0, 0, True)]
CASES = {"w<t": lambda s: s.window_size < s.text_round, "w=t": lambda s: s.window_size == s.text_round,
         "w>t": lambda s: s.window_size > s.text_round}


def test_the_settings_cover_all_three_cases():
    assert all(sum(map(case, SETTINGS)) >= 2 for case in CASES.values())


TURN = len(USER) + len(time_tokens(0)) + len(USER_END)  # a user turn besides its vision block and query


def capacity(s, previous, query, reply):
    fixed = len(HEAD) + len(PREV_CLOSE) + len(query) + max(len(previous), s.text_sink + s.text_window)
    return s.capacity(fixed, len(vision_tokens()), TURN, len(OPEN) + reply + len(CLOSE))


@pytest.mark.parametrize("s", SETTINGS, ids=lambda s: f"w{s.window_size}r{s.text_round}s{s.text_sink}t{s.text_window}"
                         f"{'q' if s.keep_query else ''}")
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
    assert max(sizes) <= capacity(s, previous, (300, 301), 5)  # the static path's capacity holds it
    assert max(sizes[600:]) == max(sizes[500:600])  # bounded, and settled
    assert driver.pool.capacity <= 2 * max(sizes)


@pytest.mark.parametrize("s", SETTINGS, ids=lambda s: f"w{s.window_size}r{s.text_round}")
def test_the_capacity_bound_is_reached_and_never_exceeded(s):
    """With replies of the longest length the bound is reached, up to the close of the round being answered (fed
    at the next chunk), the Time= text of turns whose reply went (w > t) and a query no longer there."""
    longest, query = [500, 501, 502, 503, 504], [300, 301]
    driver = Driver(s, previous=range(s.text_sink + s.text_window), query=query, reply=lambda i: longest)
    sizes = []
    for i in range(3 * max(s.window_size, s.text_round) + 10):
        driver.chunk(i)
        sizes.append(len(driver.ctx.tokens()))
    bound = capacity(s, range(s.text_sink + s.text_window), query, len(longest))
    lost = len(time_tokens(0)) * max(0, s.window_size - s.text_round)
    assert bound - len(CLOSE) - lost - len(query) <= max(sizes) <= bound


def test_a_smaller_vision_window_keeps_fewer_tokens():
    """--window-size 4 against the default 16, both with 16 text rounds: 12 vision blocks fewer, nothing else."""
    steady = {}
    for w in (4, 16):
        driver = Driver(Settings(window_size=w, text_round=16), reply=lambda i: [500, 501])
        for i in range(100):
            driver.chunk(i)
        steady[w] = driver.ctx.tokens().tolist()
    assert len(steady[16]) - len(steady[4]) == 12 * len(vision_tokens())
    assert [t for t in steady[16] if t not in vision_tokens()] == [t for t in steady[4] if t not in vision_tokens()]


def test_user_turns_and_verbatim_replies_are_counted_in_chunks():
    s = Settings(window_size=3, text_round=5, text_sink=4, text_window=6)
    driver = Driver(s)
    for i in range(40):
        driver.chunk(i)
    ctx = driver.ctx
    with_user = [r.index for r in ctx.rounds if r.user]
    with_vision = [r.index for r in ctx.rounds if any(seg.kind == "vision" for seg in r.user)]
    verbatim = [r.index for r in ctx.rounds if not r.folded]
    assert with_user == list(range(40 - 5, 40))  # max(window_size, text_round) user turns
    assert with_vision == list(range(40 - 3, 40))  # of which window_size keep their vision
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
