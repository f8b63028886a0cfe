"""The StreamingVLM loop: per chunk, evict, re-position, encode the frames, prefill, decode a short reply.

`Commentator.turn` is one chunk as a generator that yields each decode step it needs (`Decode`) and is sent the
logits back, so that a scheduler can run the decode steps of many streams as one batched call
(runtime/batch.py); `Commentator.step` runs them one by one, alone.
"""

import time
from collections.abc import Generator
from dataclasses import dataclass, field

import numpy as np

from .context import Context, Segment, Settings
from .engine import HostEngine, StaticEngine
from .model import Model
from .preprocess import patchify
from .prompt import Prompter
from .rope import Rope
from .sampling import Sampler, Sampling
from .video import Chunk

SHELL_TOKENS = 48  # a round's text besides vision and reply: Time= line, vision start/end, turn markers (bound)
# Rounds of context the host engine reserves up front; it grows on demand past them. A step reads every reserved
# slot (masked or not), so a small reservation keeps the step cost with the context actually held (micro: ~870
# tokens after a minute, against 2,458 slots reserved for 64 rounds, 1,706 for 8).
ROUNDS_RESERVED = 8


@dataclass
class StreamConfig:
    settings: Settings = field(default_factory=Settings)
    sampling: Sampling = field(default_factory=Sampling)
    max_new_tokens: int = 20
    query: str = "Commentate on this match"
    previous_text: str = ""
    system: str | None = None
    timestamps: bool = False  # also write Qwen3-VL's own "<t seconds>" before each chunk's vision tokens
    static: bool = False  # fixed-shape sessions and a device-resident cache (MIGraphX needs this)
    cache_capacity: int | None = None  # slots; default derived from the windows and the frame size
    # Questions asked mid-stream: each is cut to question_tokens (0: none expected; the capacity leaves no room
    # for them) and its chunk's reply, the answer, may run to answer_max_new_tokens.
    question_tokens: int = 0
    answer_max_new_tokens: int = 64


@dataclass
class Reply:
    index: int
    start: float
    end: float
    tokens: list[int]
    text: str
    cache_tokens: int  # retained context after this chunk
    seconds: dict[str, float]  # time per stage
    logits: np.ndarray  # [V] after the prefill: what the first reply token is chosen from
    question: str | None = None  # asked in this chunk's user turn: the reply is its answer


@dataclass
class Decode:
    """A stream's next decode step: one token's embedding [1, H] at `positions` [3, 1], its K/V to `slots` [1]."""
    engine: HostEngine | StaticEngine
    embeds: np.ndarray
    positions: np.ndarray
    slots: np.ndarray

    def alone(self) -> np.ndarray:
        """Run this step by itself (a decoder call of one row): the token's logits [V]."""
        model = self.engine.model
        deepstack = np.zeros((model.n_deepstack, 1, model.hidden), np.float32)
        return self.engine.run(self.embeds, deepstack, self.positions, self.slots)


class Commentator:
    def __init__(self, model: Model, config: StreamConfig, batch=None):
        """`batch` (runtime.batch.Batch): the stream's cache is a row of the batch's, so that its decode steps can
        share calls with other streams'; None: a cache of its own."""
        manifest = model.manifest
        self.model, self.config = model, config
        self.prep, self.ids = manifest["preprocess"], manifest["tokens"]
        self.stop = set(manifest["stop_tokens"])
        self.prompter = Prompter(manifest, config.system, config.previous_text, config.query, config.timestamps)
        self.context = Context(config.settings, suffix=self.prompter.suffix)
        self.sampler = Sampler(config.sampling)
        text = manifest["text"]
        self.rope = Rope(text["inv_freq"], text["mrope_section"])
        self.engine: HostEngine | StaticEngine | None = None  # sized once the frame size is known
        self.batch = batch
        self.chunks = 0

    def capacity(self, tokens_per_chunk: int) -> int:
        """An upper bound of the retained context (the host engine also grows on demand, so there it only says how
        much to reserve up front, at most ROUNDS_RESERVED rounds)."""
        s, p = self.config.settings, self.prompter
        fixed = len(p.head()) + len(p.previous_close()) + len(p.encode(self.config.query))
        fixed += max(len(p.previous()), s.text_sink + s.text_window)
        c = self.config
        reply = max(c.max_new_tokens, c.answer_max_new_tokens if c.question_tokens else 0)
        answer, turn = len(p.open()) + reply + len(p.close()), SHELL_TOKENS + c.question_tokens
        bound = s.capacity(fixed, tokens_per_chunk, turn, answer)
        if self.config.static:
            return bound
        return min(bound, fixed + ROUNDS_RESERVED * (tokens_per_chunk + turn + reply))

    def step(self, chunk: Chunk, question: str | None = None) -> Reply:
        """One chunk; `question` (a user's, asked since the last chunk) joins this chunk's user turn and the reply
        answers it. Every decode step runs alone."""
        turn = self.turn(chunk, question)
        try:
            step = next(turn)
            while True:
                step = turn.send(step.alone())
        except StopIteration as done:
            return done.value

    def turn(self, chunk: Chunk, question: str | None = None) -> Generator[Decode, np.ndarray, Reply]:
        """One chunk as `step` does it, but each decode step is yielded and its logits [V] are sent back."""
        seconds, t = {}, time.perf_counter()
        patches = patchify(chunk.frames, self.prep["patch_size"], self.prep["temporal_patch_size"],
                           self.prep["merge_size"], self.prep["image_mean"], self.prep["image_std"],
                           self.prep["rescale_factor"])
        p, m = self.prep["patch_size"], self.prep["merge_size"]
        grid_h, grid_w = chunk.frames.shape[1] // p, chunk.frames.shape[2] // p
        grid = (grid_h // m, grid_w // m)
        seconds["preprocess"], t = time.perf_counter() - t, time.perf_counter()
        vision_embeds, vision_deepstack = self.model.encode_video(patches, grid_h, grid_w, self.config.static)
        seconds["vision"], t = time.perf_counter() - t, time.perf_counter()

        if self.engine is None:
            vision_tokens = len(patches) * grid[0] * grid[1]
            capacity = self.config.cache_capacity or self.capacity(vision_tokens)
            if self.config.static and self.batch is not None and not self.config.cache_capacity:
                capacity = -(-capacity // 256) * 256  # streams batch with those of the same capacity: round it
            if self.config.static:
                rows = self.batch.device_rows(capacity) if self.batch else None
                self.engine = StaticEngine(self.model, capacity, vision_tokens + SHELL_TOKENS, rows)
            else:
                rows = self.batch.host_rows(capacity) if self.batch else None
                self.engine = HostEngine(self.model, capacity, self.rope, rows)
        asked = None
        if question is not None:
            asked = self.prompter.encode(question)[:self.config.question_tokens or None]
        self._evict_and_add(chunk, len(patches), grid, asked)
        logits = self._prefill(vision_embeds, vision_deepstack)
        seconds["prefill"], t = time.perf_counter() - t, time.perf_counter()
        tokens = yield from self._decode(logits, self.config.answer_max_new_tokens if asked is not None else
                                         self.config.max_new_tokens)
        seconds["decode"] = time.perf_counter() - t
        self.chunks += 1
        return Reply(chunk.index, chunk.start, chunk.end, tokens, self.prompter.decode(tokens),
                     len(self.context.tokens()), seconds, logits, question)

    def _segment(self, tokens: np.ndarray, kind: str = "text", grid=None) -> Segment:
        return Segment(tokens, self.engine.pool.allocate(len(tokens)), grid, kind)

    def _evict_and_add(self, chunk: Chunk, patches: int, grid: tuple[int, int], question: np.ndarray | None) -> None:
        ctx, prompter, index = self.context, self.prompter, self.chunks
        for slots in ctx.evict(index):
            self.engine.pool.free(slots)
        if index == 0:
            ctx.head = self._segment(prompter.head())
            ctx.previous = self._segment(prompter.previous())
            ctx.previous_close = self._segment(prompter.previous_close())
        ctx.add_round(index, prompter, self._segment, chunk.start, chunk.end, grid, patches, question)

    def _prefill(self, vision_embeds: np.ndarray, vision_deepstack: np.ndarray) -> np.ndarray:
        """One decoder call over every retained token not yet fed (this chunk's prompt and what the last reply
        left unfed), after re-rotating the cached keys whose position the eviction changed."""
        ctx, engine, model = self.context, self.engine, self.model
        slots, positions = ctx.slots(), ctx.positions()
        engine.reposition(slots, positions)
        fresh = len(slots) - np.flatnonzero(engine.pool.written[slots]).max(initial=-1) - 1  # the unfed tail
        tokens, slots, positions = ctx.tokens()[-fresh:], slots[-fresh:], positions[:, -fresh:]
        embeds = model.embed(tokens)
        visual = tokens == self.ids["video_pad"]
        embeds[visual] = vision_embeds
        deepstack = np.zeros((model.n_deepstack, fresh, model.hidden), np.float32)
        deepstack[:, visual] = vision_deepstack
        self._next_position = int(positions[0, -1]) + 1
        return engine.run(embeds, deepstack, positions, slots)

    def close(self) -> None:
        """Free the stream's cache row (a batch's row goes to the next stream)."""
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    def _decode(self, logits: np.ndarray, max_new_tokens: int) -> Generator[Decode, np.ndarray, list[int]]:
        """Up to max_new_tokens; every token but the last is fed at once, the last (or the cap's) at the next
        prefill, so that eviction happens before it is seen, as in the reference."""
        ctx, engine, model = self.context, self.engine, self.model
        seen = np.unique(ctx.tokens())  # the penalty counts each id once: reduce the context once per chunk
        reply = ctx.rounds[-1].reply = self._segment(np.zeros(0, np.int64))
        tokens = []
        for k in range(max_new_tokens):
            token = self.sampler(logits, np.concatenate([seen, tokens]).astype(np.int64))
            if token in self.stop:
                break
            tokens.append(token)
            slot = engine.pool.allocate(1)
            reply.tokens, reply.slots = np.append(reply.tokens, token), np.append(reply.slots, slot)
            if k == max_new_tokens - 1:
                break
            position = np.full((3, 1), self._next_position, np.int64)
            logits = yield Decode(engine, model.embed([token]), position, slot)
            self._next_position += 1
        return tokens
