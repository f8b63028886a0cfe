"""The retained conversation of a stream and StreamingVLM's eviction policy over it.

Logical layout (what the model sees, in order):

    [head: system block, "<|im_start|>previous text\\n"] [pinned query] [previous text: sink + window]
    ["<|im_end|>\\n"] [rounds: user turn, "<|im_start|>assistant\\n", reply, "<|im_end|>\\n"]

A user turn is "<|im_start|>user\\n", its Time= text, its vision block (<|vision_start|>, the video pads,
<|vision_end|>), the query (chunk 0 only) and "<|im_end|>\\n". The vision window and the text rounds are
independent: a turn loses its vision block after `window_size` chunks if that comes first, or its Time= text
with its reply after `text_round` chunks if that comes first, and goes whole after the larger of the two.

Every segment owns the physical cache slots of its tokens; this module only decides which segments stay and in
what order. Positions are recomputed over the whole retained sequence after each eviction (contiguous RoPE), so
evicted tokens leave no gaps and moved tokens take the positions of their new place.
"""

from dataclasses import dataclass, field

import numpy as np

from .positions import rope_positions


@dataclass
class Segment:
    tokens: np.ndarray  # int64 token ids
    slots: np.ndarray  # int64 physical cache slots, one per token
    grid: tuple[int, int] | None = None  # the video pads of one temporal patch: merged (rows, cols); None = text
    # "text"; "time" (a turn's Time= text); "vision" (a turn's vision block: its markers and pads); "query" (the
    # user's question in chunk 0, which may be pinned); "question" (asked mid-stream: lives with the turn's text)
    kind: str = "text"

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass
class Round:
    """One chunk's exchange. `user` ends with the user's <|im_end|>\\n; `open` is <|im_start|>assistant\\n."""
    index: int  # the chunk it belongs to
    user: list[Segment]
    open: Segment
    reply: Segment = field(default_factory=lambda: _empty())  # the generated content
    # <|im_end|>\n, fed at the start of the next chunk's prefill, after that chunk's eviction
    close: Segment = field(default_factory=lambda: _empty())
    folded: bool = False  # the reply has moved into the previous text

    def segments(self) -> list[Segment]:
        return [s for s in (*self.user, self.open, self.reply, self.close) if len(s)]


@dataclass
class Settings:
    window_size: int = 16  # the last window_size user turns keep their vision block
    text_round: int = 16  # the last text_round rounds keep their reply verbatim (and their Time= text)
    text_sink: int = 512  # first previous-text tokens kept forever
    text_window: int = 512  # last previous-text tokens kept
    keep_query: bool = False  # pin the first turn's query instead of forgetting it with that turn

    def capacity(self, fixed: int, vision: int, turn: int, answer: int) -> int:
        """The most tokens ever retained: `fixed` (head, previous text, pinned query) plus, after an eviction, a
        vision block (`vision` tokens) in each of the last window_size turns, the rest of a user turn (`turn`) in
        each of the last max(window_size, text_round), and an assistant turn (`answer`: its markers and reply) in
        each of the last text_round."""
        turns = max(self.window_size, self.text_round)
        return fixed + self.window_size * vision + turns * turn + self.text_round * answer


def _empty() -> Segment:
    return Segment(np.zeros(0, np.int64), np.zeros(0, np.int64))


def _join(a: Segment, b: Segment) -> Segment:
    return Segment(np.concatenate([a.tokens, b.tokens]), np.concatenate([a.slots, b.slots]))


@dataclass
class Context:
    settings: Settings
    suffix: tuple[int, ...] = ()  # token ids of the trained " ..." ending, dropped when a reply is folded
    head: Segment = field(default_factory=_empty)
    pinned: list[Segment] = field(default_factory=list)
    previous: Segment = field(default_factory=_empty)  # content of the "previous text" block
    previous_close: Segment = field(default_factory=_empty)
    rounds: list[Round] = field(default_factory=list)

    def segments(self) -> list[Segment]:
        out = [self.head, *self.pinned, self.previous, self.previous_close]
        for r in self.rounds:
            out += r.segments()
        return [s for s in out if len(s)]

    def tokens(self) -> np.ndarray:
        return np.concatenate([s.tokens for s in self.segments()])

    def slots(self) -> np.ndarray:
        return np.concatenate([s.slots for s in self.segments()])

    def positions(self) -> np.ndarray:
        """Positions [3, n] of the retained tokens in logical order, counted from 0 without gaps."""
        return rope_positions([s.grid if s.grid else len(s) for s in self.segments()])[0]

    def add_round(self, index: int, prompter, segment, start: float, end: float, grid: tuple[int, int], patches: int,
                  question: np.ndarray | None) -> None:
        """Chunk `index`'s round, after its eviction: the last chunk's reply closed (unless it was folded), then this
        chunk's user turn (`patches` temporal patches of `grid` merged tokens, `question` token ids or None) and the
        assistant opener. `segment(ids, kind, grid)` gives the tokens their cache slots (the runtime's and the
        training's streams differ only there)."""
        if self.rounds and self.rounds[-1].index == index - 1 and not self.rounds[-1].folded:
            self.rounds[-1].close = segment(prompter.close())
        user = [segment(ids, kind, grid if patch else None)
                for kind, ids, patch in prompter.user_turn(start, end, grid[0] * grid[1], patches, index == 0,
                                                           question)]
        self.rounds.append(Round(index, user, segment(prompter.open())))

    def evict(self, chunk: int) -> list[np.ndarray]:
        """StreamingVLM's eviction at the start of `chunk`, before its prefill; returns the freed slots."""
        s, freed = self.settings, []
        for r in self.rounds:
            age = chunk - r.index
            # 1. a reply text_round chunks old moves, with its K/V, to the end of the previous text; its shell goes.
            # If the vision outlives the text, the turn's Time= text goes with it: the turn keeps only its vision.
            # A question asked in that turn goes too: it is text of the round whose reply (its answer) just left.
            if age >= s.text_round and not r.folded:
                freed += self._fold(r)
                if s.window_size > s.text_round:
                    freed += self._drop(r, "time") + self._drop(r, "question")
            # 2. if the text outlives the vision, the turn's vision block goes at window_size; its text stays
            if age >= s.window_size and s.window_size < s.text_round:
                freed += self._drop(r, "vision")
            # 3. a user turn max(window_size, text_round) chunks old goes: what is left of it, the first query too
            if age >= max(s.window_size, s.text_round) and r.user:
                freed += self._drop_user(r)
        self.rounds = [r for r in self.rounds if r.segments()]
        # 4. the previous text keeps its first text_sink and last text_window tokens
        if len(self.previous) > s.text_sink + s.text_window:
            cut = np.arange(s.text_sink, len(self.previous) - s.text_window)
            freed.append(self.previous.slots[cut])
            self.previous = Segment(np.delete(self.previous.tokens, cut), np.delete(self.previous.slots, cut))
        return [f for f in freed if len(f)]

    def _fold(self, r: Round) -> list[np.ndarray]:
        freed = [r.open.slots, r.close.slots]
        reply, n = r.reply, len(self.suffix)
        if n and len(reply) >= n and tuple(reply.tokens[-n:]) == self.suffix:
            freed.append(reply.slots[-n:])
            reply = Segment(reply.tokens[:-n], reply.slots[:-n])
        self.previous = _join(self.previous, reply)
        r.open, r.reply, r.close, r.folded = _empty(), _empty(), _empty(), True
        return freed

    def _drop(self, r: Round, kind: str) -> list[np.ndarray]:
        freed = [segment.slots for segment in r.user if segment.kind == kind]
        r.user = [segment for segment in r.user if segment.kind != kind]
        return freed

    def _drop_user(self, r: Round) -> list[np.ndarray]:
        freed = []
        for segment in r.user:
            if segment.kind == "query" and self.settings.keep_query:
                self.pinned.append(segment)
            else:
                freed.append(segment.slots)
        r.user = []
        return freed
