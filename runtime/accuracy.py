"""How right the micro model's commentary and answers are: `python -m runtime.accuracy [--graphs graphs/micro]
[--streams 5] [--seconds 600]`.

Streams chunks of the synthetic world (runtime/world.py) straight into the runtime's Commentator (ONNX Runtime, no
PyTorch, default StreamingVLM windows, greedy), asking the world's questions at random chunks as `--questions` and
the server place them, and compares each second's cue with the truth: exact caption (and event, colour and shape
separately), exact answer per question kind. Prints, over held-out world seeds: the captions, their first and last
minutes (95% Wilson intervals), the same last minutes streamed from an empty context (a paired comparison: same
frames, same captions, so any difference is the eviction's), the answers per kind (past ones split by whether
the answer left the 16-s vision window), and the shuffled control (each chunk fed another chunk's frames), which
must score near chance.
"""

import argparse
import json
import math
import sys
from dataclasses import dataclass

import numpy as np

from .commentator import Commentator, StreamConfig
from .context import Settings
from .manifest import Manifest, ManifestError
from .model import Model
from .sampling import Sampling
from .subtitles import clean_text
from .video import Chunk
from .world import PAST, PRESENT, Asker, Event, Question, Said, World, parse_caption

QUESTION_RATE = 0.1  # a question about every 10 s


@dataclass
class Score:
    n: int
    exact: int
    event: int
    colour: int  # over the chunks whose event has a colour (all but "nothing")
    shape: int
    described: int  # chunks whose event has a colour and a shape

    def row(self) -> dict:
        return {"chunks": self.n, "exact": self.exact / self.n, "exact_interval": wilson(self.exact, self.n),
                "event": self.event / self.n, "colour": self.colour / max(self.described, 1),
                "shape": self.shape / max(self.described, 1)}


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a binomial proportion."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return round(centre - half, 4), round(centre + half, 4)


def score(pairs) -> Score:
    """pairs: (true Event, cue text) -> the counts."""
    s = Score(0, 0, 0, 0, 0, 0)
    for truth, text in pairs:
        said = parse_caption(text)
        s.n += 1
        s.exact += said == truth
        s.event += said is not None and said.kind == truth.kind
        if truth.colour:
            s.described += 1
            s.colour += said is not None and said.colour == truth.colour
            s.shape += said is not None and said.shape == truth.shape
    return s


def stream(model: Model, seed: int, seconds: int, shuffle: bool = False, settings: Settings | None = None,
           start: int = 0, questions: float = 0.0) -> list[tuple]:
    """[(truth, reply text)] for `seconds` chunks of World(seed) from second `start` on, streamed from an empty
    context (Time= stamps keep the absolute seconds, as `--start` does). The truth is the chunk's Event, or the
    Question asked in it (at rate `questions`, by world.Asker) whose answer the reply is. With shuffle, chunk i gets
    the frames of a random other chunk (a fixed permutation), so only a model that reads its frames is right."""
    commentator = Commentator(model, StreamConfig(settings or Settings(), Sampling(temperature=0.0),
                                                  question_tokens=64 if questions else 0))
    world, asker = World(seed), Asker(np.random.default_rng([seed, 2]), questions)
    chunks, asked = [], []
    for index, (frames, event) in enumerate(world.chunks(start + seconds)):
        chunks.append((frames, event))
        if index < start:  # seconds before the stream: what a question about the past may not be about
            asker.history.append(Said(index, event, False))
        asked.append(asker.maybe(index, event, world.things) if index >= start else None)
    chunks, asked = chunks[start:], asked[start:]
    order = np.random.default_rng(seed).permutation(seconds) if shuffle else np.arange(seconds)
    pairs = []
    for index in range(seconds):
        frames, truth = chunks[order[index]][0], asked[index] or chunks[index][1]
        question = asked[index].text if asked[index] else None
        reply = commentator.step(Chunk(index, float(start + index), start + index + 1.0, frames), question)
        pairs.append((truth, clean_text(reply.text)))
    return pairs


def captions(pairs) -> list[tuple]:
    return [(truth, text) for truth, text in pairs if isinstance(truth, Event)]


def answers(pairs, window: int = Settings.window_size) -> dict[str, list[bool]]:
    """Whether each answer is exact, by question kind; also "present" and "past, out of the vision window" (the
    event it is about is at least `window` chunks old)."""
    out: dict[str, list[bool]] = {}
    for truth, text in pairs:
        if isinstance(truth, Question):
            right = text.strip() == truth.answer
            out.setdefault(truth.kind, []).append(right)
            if truth.kind in PRESENT:
                out.setdefault("present", []).append(right)
            if truth.kind in PAST and truth.age >= window:
                out.setdefault("past, out of the vision window", []).append(right)
    return out


def paired(after_eviction, fresh) -> tuple[int, int, float]:
    """The same chunks captioned late in a long stream and in a fresh one: (right only when fresh, right only after
    eviction, one-sided exact McNemar p-value that eviction makes it worse). Chunks that were a question's in the
    long stream are left out."""
    both = [(t, a, f) for (t, a), (_, f) in zip(after_eviction, fresh) if isinstance(t, Event)]
    worse = sum(parse_caption(a) != t and parse_caption(f) == t for t, a, f in both)
    better = sum(parse_caption(a) == t and parse_caption(f) != t for t, a, f in both)
    n = worse + better
    p = sum(math.comb(n, k) for k in range(worse, n + 1)) / 2 ** n if n else 1.0
    return worse, better, p


def proportion(right: list[bool]) -> dict:
    return {"n": len(right), "exact": sum(right) / max(len(right), 1), "exact_interval": wilson(sum(right), len(right))}


def report(streams, shuffled=None, fresh=None, minute: int = 60) -> dict:
    """The table over one or more streams (lists of pairs): captions, their first and last minutes, the last
    minutes streamed fresh, the answers per kind, and the shuffled control."""
    streams = [streams] if streams and isinstance(streams[0], tuple) else streams
    out = {"captions": score(sum((captions(p) for p in streams), [])).row(),
           "first_minutes": score(sum((captions(p[:minute]) for p in streams), [])).row(),
           "last_minutes": score(sum((captions(p[-minute:]) for p in streams), [])).row()}
    if fresh is not None:  # the chunks the long streams captioned (not those a question took there)
        kept = [(truth, f) for p, q in zip(streams, fresh) for (truth, _), (_, f) in zip(p[-minute:], q)
                if isinstance(truth, Event)]
        out["last_minutes_fresh"] = score(kept).row()
    said = {}
    for p in streams:
        for kind, right in answers(p).items():
            said.setdefault(kind, []).extend(right)
    out["answers"] = {kind: proportion(right) for kind, right in sorted(said.items())}
    if shuffled is not None:
        out["shuffled"] = {"captions": score(captions(shuffled)).row(),
                           "answers": {k: proportion(v) for k, v in sorted(answers(shuffled).items())}}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.accuracy", description=__doc__.splitlines()[0])
    parser.add_argument("--graphs", default="graphs/micro")
    parser.add_argument("--streams", type=int, default=5, help="how many streams (world seeds seed, seed+1, ...)")
    parser.add_argument("--seconds", type=int, default=600, help="length of each stream")
    parser.add_argument("--seed", type=int, default=11, help="first world seed (< 1,000,000: never seen in training)")
    parser.add_argument("--questions", type=float, default=QUESTION_RATE, help="chance of a question per chunk")
    parser.add_argument("--control-seconds", type=int, default=300, help="length of the shuffled control")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="also write the table as JSON here")
    args = parser.parse_args(argv)
    try:
        model = Model(Manifest.load(args.graphs), threads=args.threads)  # the sessions once, for every stream
    except ManifestError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    seeds = range(args.seed, args.seed + args.streams)
    minute = min(60, args.seconds)
    streams = [stream(model, seed, args.seconds, questions=args.questions) for seed in seeds]
    fresh = [stream(model, seed, minute, start=args.seconds - minute) for seed in seeds]
    shuffled = stream(model, args.seed + args.streams, args.control_seconds, shuffle=True,
                      questions=args.questions)
    table = report(streams, shuffled, fresh, minute)
    print(f"{args.streams} streams of {args.seconds} s (world seeds {seeds.start}..{seeds.stop - 1}), a question "
          f"about every {1 / args.questions:.0f} s" if args.questions else "")
    rows = [(name, table[name]) for name in ("captions", "first_minutes", "last_minutes", "last_minutes_fresh")]
    rows += [(f"answers: {kind}", row) for kind, row in table["answers"].items()]
    rows += [("shuffled: captions", table["shuffled"]["captions"])]
    rows += [(f"shuffled: {kind}", row) for kind, row in table["shuffled"]["answers"].items()]
    for name, row in rows:
        low, high = row["exact_interval"]
        n = row.get("chunks", row.get("n"))
        print(f"{name:40s} {n:5d}  exact {row['exact']:6.1%} [{low:.1%}, {high:.1%}]")
    worse, better, p = paired([pair for s in streams for pair in s[-minute:]], [pair for f in fresh for pair in f])
    table["eviction_paired"] = {"right_only_fresh": worse, "right_only_after_eviction": better, "p_worse": p}
    print(f"last minutes after {args.seconds} s vs the same minutes streamed fresh: {worse} chunks right only fresh, "
          f"{better} right only after eviction (one-sided McNemar p = {p:.3f})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(table, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
