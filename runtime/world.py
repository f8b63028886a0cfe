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
