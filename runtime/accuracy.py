"""How right the commentary of a world stream is: `python -m runtime.accuracy [--graphs graphs/micro] [--seconds 600]`.

Streams chunks of the synthetic world (runtime/world.py) straight into the runtime's Commentator (ONNX Runtime, no
PyTorch, default StreamingVLM windows, greedy) and compares each second's cue with the true caption: exact caption,
and event, colour and shape separately. Prints the whole stream, its first and last minute (95% Wilson intervals)
the same last minute streamed from an empty context (a paired comparison: same frames, same captions, so any
difference is the eviction's), and the shuffled control (each chunk fed another chunk's frames), which must score
near chance.
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
from .world import World, parse_caption


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
           start: int = 0) -> list[tuple]:
    """[(true Event, cue text)] for `seconds` chunks of World(seed) from second `start` on, streamed from an empty
    context (Time= stamps keep the absolute seconds, as `--start` does); with shuffle, chunk i gets the frames of a
    random other chunk (a fixed permutation), so only a model that reads its frames loses."""
    commentator = Commentator(model, StreamConfig(settings or Settings(), Sampling(temperature=0.0)))
    chunks = list(World(seed).chunks(start + seconds))[start:]
    order = np.random.default_rng(seed).permutation(seconds) if shuffle else np.arange(seconds)
    pairs = []
    for index in range(seconds):
        frames, truth = chunks[order[index]][0], chunks[index][1]
        reply = commentator.step(Chunk(index, float(start + index), start + index + 1.0, frames))
        pairs.append((truth, clean_text(reply.text)))
    return pairs


def paired(after_eviction, fresh) -> tuple[int, int, float]:
    """The same chunks captioned late in a long stream and in a fresh one: (right only when fresh, right only after
    eviction, one-sided exact McNemar p-value that eviction makes it worse)."""
    worse = sum(parse_caption(a) != t and parse_caption(f) == t for (t, a), (_, f) in zip(after_eviction, fresh))
    better = sum(parse_caption(a) == t and parse_caption(f) != t for (t, a), (_, f) in zip(after_eviction, fresh))
    n = worse + better
    p = sum(math.comb(n, k) for k in range(worse, n + 1)) / 2 ** n if n else 1.0
    return worse, better, p


def report(pairs, shuffled=None, fresh=None, minute: int = 60) -> dict:
    """The table: the whole stream, its first and last minute, the last minute streamed fresh, the control."""
    out = {"stream": score(pairs).row(), "first_minute": score(pairs[:minute]).row(),
           "last_minute": score(pairs[-minute:]).row()}
    if fresh is not None:
        out["last_minute_fresh"] = score(fresh).row()
    if shuffled is not None:
        out["shuffled"] = score(shuffled).row()
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.accuracy", description=__doc__.splitlines()[0])
    parser.add_argument("--graphs", default="graphs/micro")
    parser.add_argument("--seconds", type=int, default=600)
    parser.add_argument("--seed", type=int, default=11, help="world seed (< 1,000,000: never seen in training)")
    parser.add_argument("--control-seconds", type=int, default=120, help="length of the shuffled control")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="also write the table as JSON here")
    args = parser.parse_args(argv)
    try:
        model = Model(Manifest.load(args.graphs), threads=args.threads)  # the sessions once, for all three streams
    except ManifestError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    pairs = stream(model, args.seed, args.seconds)
    minute = min(60, args.seconds)
    fresh = stream(model, args.seed, minute, start=args.seconds - minute)
    shuffled = stream(model, args.seed + 1, args.control_seconds, shuffle=True)
    table = report(pairs, shuffled, fresh, minute)
    for name, row in table.items():
        low, high = row["exact_interval"]
        print(f"{name:17s} {row['chunks']:4d} chunks  exact {row['exact']:6.1%} [{low:.1%}, {high:.1%}]  "
              f"event {row['event']:6.1%}  colour {row['colour']:6.1%}  shape {row['shape']:6.1%}")
    worse, better, p = paired(pairs[-minute:], fresh)
    table["eviction_paired"] = {"right_only_fresh": worse, "right_only_after_eviction": better, "p_worse": p}
    print(f"last minute after {args.seconds} s vs the same minute streamed fresh: {worse} chunks right only fresh, "
          f"{better} right only after eviction (one-sided McNemar p = {p:.3f})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(table, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
