"""The synthetic world the built-in micro model was trained on: coloured shapes on a plain background, one event
per second, each described by a sentence of a closed language.

A scene holds 1..`max_objects` objects, each a (colour, shape) pair that is unique in the scene, on a 4x4 grid of
32-pixel cells (one cell is one merged vision token of a 128x128 frame). Each 1-second chunk has two frames (2 fps)
and one event happens between them: an object moves one cell left/right/up/down, a new object appears, one
disappears, or nothing happens. The generator is seeded and pure numpy: training (export/train_micro.py), the
sample clip (`python -m runtime.sample --world`) and the tests all draw from it.
"""

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 235), "yellow": (235, 215, 40)}
SHAPES = ("circle", "square", "triangle")
MOVES = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
EVENTS = (*MOVES, "appears", "disappears", "nothing")
BACKGROUND = (40, 40, 48)
SIZE, CELL = 128, 32  # frame side and grid cell, pixels
GRID = SIZE // CELL
SILENCE = "\n ..."  # the trained reply of a second where nothing happens (StreamingVLM's silent reply)
ENDING = " ..."  # StreamingVLM's models end each second's text with it; the runtime strips it


@dataclass(frozen=True)
class Thing:
    colour: str
    shape: str
    row: int
    col: int


@dataclass(frozen=True)
class Event:
    kind: str  # one of EVENTS
    colour: str | None = None
    shape: str | None = None

    def caption(self) -> str:
        """The sentence for this event, "" when nothing happens."""
        if self.kind == "nothing":
            return ""
        if self.kind == "appears":
            return f"a {self.colour} {self.shape} appears"
        if self.kind == "disappears":
            return f"the {self.colour} {self.shape} disappears"
        return f"the {self.colour} {self.shape} moves {self.kind}"

    def reply(self) -> str:
        """What the model says for this second, with StreamingVLM's ending."""
        caption = self.caption()
        return caption + ENDING if caption else SILENCE


def parse_caption(text: str) -> Event | None:
    """The event a caption (as the runtime prints it, ending stripped) describes; None if it is not in the language."""
    words = text.strip().split()
    if not words:
        return Event("nothing")
    if len(words) == 4 and words[0] == "a" and words[3] == "appears":
        kind = "appears"
    elif len(words) == 4 and words[0] == "the" and words[3] == "disappears":
        kind = "disappears"
    elif len(words) == 5 and words[0] == "the" and words[3] == "moves" and words[4] in MOVES:
        kind = words[4]
    else:
        return None
    if words[1] not in COLOURS or words[2] not in SHAPES:
        return None
    return Event(kind, words[1], words[2])


def render(things, rng: np.random.Generator | None = None, noise: float = 0.0) -> np.ndarray:
    """One frame: uint8 [SIZE, SIZE, 3] RGB. `noise` adds Gaussian pixel noise of that standard deviation (training)."""
    frame = np.empty((SIZE, SIZE, 3), np.float32)
    frame[:] = BACKGROUND
    y, x = np.mgrid[0:CELL, 0:CELL] + 0.5
    c = CELL / 2
    masks = {"circle": (y - c) ** 2 + (x - c) ** 2 <= 13.0 ** 2,
             "square": (np.abs(y - c) <= 11.5) & (np.abs(x - c) <= 11.5),
             # apex at the top, base at the bottom: |x - c| grows with y
             "triangle": (y >= 3) & (y <= 29) & (np.abs(x - c) <= (y - 3) * 13.5 / 26)}
    for t in things:
        cell = frame[t.row * CELL:(t.row + 1) * CELL, t.col * CELL:(t.col + 1) * CELL]
        cell[masks[t.shape]] = COLOURS[t.colour]
    if noise and rng is not None:
        frame += rng.normal(0, noise, frame.shape).astype(np.float32)
    return np.clip(np.rint(frame), 0, 255).astype(np.uint8)


CELL_CLASSES = 1 + len(COLOURS) * len(SHAPES)  # what a grid cell holds: nothing, or one of the objects


def cells(things) -> np.ndarray:
    """[GRID * GRID] class of each cell, row by row: 0 empty, else 1 + the object's (colour, shape) index."""
    out = np.zeros(GRID * GRID, np.int64)
    for t in things:
        out[t.row * GRID + t.col] = 1 + list(COLOURS).index(t.colour) * len(SHAPES) + SHAPES.index(t.shape)
    return out


class World:
    """A seeded scene that advances one event per chunk."""

    def __init__(self, seed: int, max_objects: int = 4, noise: float = 0.0):
        self.rng = np.random.default_rng(seed)
        self.noise_rng = np.random.default_rng([seed, 1])  # its own stream: the events do not depend on the noise
        self.max_objects, self.noise = max_objects, noise
        self.things: list[Thing] = []
        self.things.append(self._new_thing())

    def _free_cells(self) -> list[tuple[int, int]]:
        taken = {(t.row, t.col) for t in self.things}
        return [(r, c) for r in range(GRID) for c in range(GRID) if (r, c) not in taken]

    def _new_thing(self) -> Thing:
        used = {(t.colour, t.shape) for t in self.things}
        kinds = [(col, sh) for col in COLOURS for sh in SHAPES if (col, sh) not in used]
        colour, shape = kinds[self.rng.integers(len(kinds))]
        free = self._free_cells()
        row, col = free[self.rng.integers(len(free))]
        return Thing(colour, shape, row, col)

    def _moves(self) -> list[tuple[int, str]]:
        free = set(self._free_cells())
        return [(i, d) for i, t in enumerate(self.things) for d, (dr, dc) in MOVES.items()
                if (t.row + dr, t.col + dc) in free]

    def advance(self) -> Event:
        """Change the scene by one event and return it."""
        n, moves = len(self.things), self._moves()
        options = {"move": 0.56 if moves else 0.0, "appears": 0.15 if n < self.max_objects else 0.0,
                   "disappears": 0.15 if n > 1 else 0.0, "nothing": 0.14}
        names, weights = list(options), np.array(list(options.values()))
        kind = names[self.rng.choice(len(names), p=weights / weights.sum())]
        if kind == "move":
            i, direction = moves[self.rng.integers(len(moves))]
            t = self.things[i]
            dr, dc = MOVES[direction]
            self.things[i] = Thing(t.colour, t.shape, t.row + dr, t.col + dc)
            return Event(direction, t.colour, t.shape)
        if kind == "appears":
            t = self._new_thing()
            self.things.append(t)
            return Event("appears", t.colour, t.shape)
        if kind == "disappears":
            t = self.things.pop(self.rng.integers(n))
            return Event("disappears", t.colour, t.shape)
        return Event("nothing")

    def frame(self) -> np.ndarray:
        return render(self.things, self.noise_rng, self.noise)

    def chunks(self, count: int) -> Iterator[tuple[np.ndarray, Event]]:
        """`count` chunks: (frames uint8 [2, SIZE, SIZE, 3], the event between them)."""
        for _ in range(count):
            before = self.frame()
            event = self.advance()
            yield np.stack([before, self.frame()]), event


def events(seed: int, count: int, max_objects: int = 4) -> list[Event]:
    """The first `count` events of World(seed) without rendering (the same events chunks() yields)."""
    world = World(seed, max_objects)
    return [world.advance() for _ in range(count)]


# Questions a user may ask mid-stream, whose true answers the world knows. The answer is the whole reply of that
# chunk (the chunk's event then goes uncaptioned). "Present" questions are about the scene in the chunk's last
# frame; "past" ones are about what the commentary said, so they are asked only while that caption is surely still
# in the retained text (PAST_HORIZON seconds: the previous text's last 512 tokens hold at least 85 folded captions
# of <= 6 tokens, plus the 16 text rounds). A past answer older than the vision window (16 s) comes from text only.
PRESENT, PAST = ("count", "colour", "where"), ("appeared", "did")
PAST_HORIZON = 90
DID = {"appears": "it appeared", "disappears": "it disappeared", **{d: f"it moved {d}" for d in MOVES}}


@dataclass(frozen=True)
class Question:
    kind: str  # one of PRESENT + PAST
    text: str
    answer: str
    age: int = 0  # past questions: seconds since the event the answer is about

    def reply(self) -> str:
        return self.answer + ENDING


@dataclass(frozen=True)
class Said:
    """One second of a stream as the commentary knows it: its event, and whether it was captioned (a second whose
    reply answered a question was not)."""
    index: int
    event: Event
    captioned: bool


def where(thing: Thing) -> str:
    """A cell of the 4x4 grid in words: top/bottom rows, left/right columns, corners both, the inner 2x2 middle."""
    vertical = {0: "top", GRID - 1: "bottom"}.get(thing.row, "")
    horizontal = {0: "left", GRID - 1: "right"}.get(thing.col, "")
    return " ".join(w for w in (vertical, horizontal) if w) or "middle"


def ask(kind: str, things, event: Event, history: list[Said], now: int,
        rng: np.random.Generator) -> Question | None:
    """A question of `kind` asked in chunk `now`, about its scene `things` (after its `event`) or the seconds
    before it (`history`), with its true answer; None when the world cannot ask it unambiguously now (a past
    question is never about the object of this chunk's event: that one goes uncaptioned)."""
    if kind == "count":
        return Question(kind, "How many objects are there?", str(len(things)))
    if kind == "colour":
        shapes = [t.shape for t in things]
        unique = [t for t in things if shapes.count(t.shape) == 1]
        if not unique:
            return None
        t = unique[rng.integers(len(unique))]
        return Question(kind, f"What colour is the {t.shape}?", t.colour)
    if kind == "where":
        t = things[rng.integers(len(things))]
        return Question(kind, f"Where is the {t.colour} {t.shape}?", where(t))
    recent = [s for s in history if s.event.kind != "nothing" and now - s.index <= PAST_HORIZON]
    if kind == "appeared":
        last = next((s for s in reversed(history) if s.event.kind == "appears"), None)
        if event.kind == "appears" or last is None or not last.captioned or now - last.index > PAST_HORIZON:
            return None
        return Question(kind, "What appeared last?", f"a {last.event.colour} {last.event.shape}", now - last.index)
    if kind == "did":
        objects = sorted({(s.event.colour, s.event.shape) for s in recent} - {(event.colour, event.shape)})
        if not objects:
            return None
        colour, shape = objects[rng.integers(len(objects))]
        last = next(s for s in reversed(history) if (s.event.colour, s.event.shape) == (colour, shape))
        if not last.captioned:
            return None
        return Question(kind, f"What did the {colour} {shape} do?", DID[last.event.kind], now - last.index)
    raise ValueError(f"unknown question kind {kind!r}")


def question_corpus() -> list[str]:
    """Every question and answer string the world can produce (the micro tokenizer's vocabulary covers them)."""
    texts = ["How many objects are there?", "What appeared last?", *map(str, range(1, 5)), *DID.values(),
             "top", "bottom", "left", "right", "middle", "top left", "top right", "bottom left", "bottom right"]
    for colour in COLOURS:
        texts.append(colour)
        for shape in SHAPES:
            texts += [f"What colour is the {shape}?", f"Where is the {colour} {shape}?",
                      f"What did the {colour} {shape} do?", f"a {colour} {shape}"]
    return [t + ENDING if not t.endswith("?") else t for t in texts]


class Asker:
    """Asks questions along a world stream: at each chunk, with probability `rate`, a question of a random kind
    that can be asked now. `maybe` is called for every chunk, in order, and records whether a question took the
    chunk's reply (`history`: what the commentary said)."""

    def __init__(self, rng: np.random.Generator, rate: float, past: float = 0.4, weights: dict | None = None):
        """`past`: the chance that a question tries the past kinds first (they are often not askable). `weights`
        ({kind: weight}, training): try the kinds in an order drawn by these weights instead."""
        self.rng, self.rate, self.past, self.weights = rng, rate, past, weights
        self.history: list[Said] = []

    def _order(self) -> list[str]:
        if self.weights:
            kinds = [k for k, w in self.weights.items() if w > 0]
            w = np.array([self.weights[k] for k in kinds], float)
            return [kinds[i] for i in self.rng.choice(len(kinds), len(kinds), replace=False, p=w / w.sum())]
        first, then = (PAST, PRESENT) if self.rng.random() < self.past else (PRESENT, PAST)
        return [str(k) for k in (*self.rng.permutation(first), *self.rng.permutation(then))]

    def maybe(self, index: int, event: Event, things) -> Question | None:
        """Chunk `index` (whose event is `event`, leaving `things`): a question, or None. Records the chunk."""
        question = None
        if self.rate and self.rng.random() < self.rate:
            for kind in self._order():
                question = ask(kind, things, event, self.history, index, self.rng)
                if question is not None:
                    break
        self.history.append(Said(index, event, question is None))
        return question
