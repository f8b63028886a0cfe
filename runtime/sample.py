"""Write a synthetic clip: `python -m runtime.sample OUT [--seconds 12] [--size 320x240] [--fps 25]`, or a clip of
the micro model's world: `python -m runtime.sample OUT --world [--seed 7] [--seconds 30] [--objects 4]`.

The default picture changes every frame (drifting background, moving shapes) so that consecutive seconds differ and
a pipeline that reuses or drops frames shows it. A world clip (runtime/world.py) is 128x128 at 2 fps, one event per
second, and comes with its true captions beside it (OUT with the suffix .truth.jsonl): what the built-in micro model
should say; and with two questions for `--questions` (OUT with the suffix .questions) whose true answers the truth
file holds.
"""

import argparse
import json
from pathlib import Path

import av
import numpy as np


def synthetic_frame(index: int, width: int, height: int, fps: int) -> np.ndarray:
    """Frame `index` of the clip: uint8 [height, width, 3] RGB, a pure function of its arguments."""
    t = index / fps
    y, x = np.mgrid[0:height, 0:width]
    frame = np.empty((height, width, 3), np.uint8)
    frame[..., 0] = (x * 200 // width + 50 * t) % 256
    frame[..., 1] = (y * 200 // height + 30 * t) % 256
    frame[..., 2] = 128 + 100 * np.sin(t)
    # A box sweeping left to right and a disc moving on a circle, both in saturated colors.
    side = max(height // 4, 2)
    left = int(t * width / 3) % max(width - side, 1)
    frame[height // 8:height // 8 + side, left:left + side] = (255, 40, 40)
    cy = height / 2 + height / 4 * np.sin(1.3 * t)
    cx = width / 2 + width / 4 * np.cos(1.3 * t)
    frame[(y - cy) ** 2 + (x - cx) ** 2 < (side / 2) ** 2] = (30, 220, 60)
    return frame


def default_codec() -> str:
    """H.264 when this PyAV build can encode it, else MPEG-4 part 2 (always built into FFmpeg)."""
    try:
        av.Codec("h264", "w")
        return "h264"
    except av.codec.codec.UnknownCodecError:
        return "mpeg4"


def write_clip(path: str | Path, seconds: float, width: int, height: int, fps: int,
               codec: str | None = None, pix_fmt: str | None = None) -> Path:
    """Encode round(seconds * fps) synthetic frames to `path` (overwritten); returns the path.

    `codec` / `pix_fmt` default to H.264 (or MPEG-4) in yuv420p; pass e.g. ("ffv1", "bgr0") for a lossless clip.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec or default_codec(), rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = pix_fmt or "yuv420p"
        for index in range(round(seconds * fps)):
            frame = av.VideoFrame.from_ndarray(synthetic_frame(index, width, height, fps), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())  # flush the encoder's delayed frames
    return path


def write_world_clip(path: str | Path, seconds: int, seed: int, max_objects: int = 4) -> tuple[Path, list]:
    """`seconds` chunks of World(seed) at 2 fps (high-quality H.264, else MPEG-4), and the true events per second;
    also writes them to OUT.truth.jsonl as {"start", "end", "text"} lines, and two questions with their true
    answers: OUT.questions (lines "@SECONDS question", for `--questions`) and "question"/"answer" on their
    seconds' truth lines."""
    from .world import World

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    codec, events, scenes = default_codec(), [], []
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=2)
        stream.width = stream.height = 128
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "8"} if codec == "h264" else {"qscale": "1"}
        world = World(seed, max_objects)
        for frames, event in world.chunks(seconds):
            events.append(event)
            scenes.append(list(world.things))
            for frame in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    questions = world_questions(events, scenes, seed)
    with open(path.with_suffix(".truth.jsonl"), "w") as truth:
        for second, event in enumerate(events):
            line = {"start": float(second), "end": second + 1.0, "text": event.caption()}
            if second in questions:
                line |= {"question": questions[second].text, "answer": questions[second].answer}
            truth.write(json.dumps(line) + "\n")
    path.with_suffix(".questions").write_text("".join(f"@{s} {q.text}\n" for s, q in sorted(questions.items())))
    return path, events


def world_questions(events, scenes, seed: int) -> dict:
    """Two questions for a world clip: about the scene a third of the way in, and about the past near the end
    (the one whose answer is oldest: out of the 16-s vision window when the clip is long enough)."""
    from .world import PAST, PRESENT, Said, ask

    rng = np.random.default_rng(seed)
    questions, now = {}, len(events) // 3
    history = [Said(i, e, True) for i, e in enumerate(events[:now])]
    for kind in PRESENT[1:] + PRESENT[:1]:
        if events and (question := ask(kind, scenes[now], events[now], history, now, rng)):
            questions[now] = question
            break
    candidates = []
    for later in range(now + 2, len(events)):
        history = [Said(i, e, i not in questions) for i, e in enumerate(events[:later])]
        for kind in PAST:
            if question := ask(kind, scenes[later], events[later], history, later, rng):
                candidates.append((question.age, later, question))
    if candidates:
        _, later, question = max(candidates, key=lambda c: (c[0], c[1]))
        questions[later] = question
    return questions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="output video file, e.g. samples/clip.mp4")
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--size", default="320x240", help="WIDTHxHEIGHT, even numbers")
    parser.add_argument("--fps", type=int, default=25)
    parser.add_argument("--world", action="store_true",
                        help="a clip of the micro model's world (128x128, 2 fps; --size and --fps do not apply)")
    parser.add_argument("--seed", type=int, default=7, help="the world's seed (--world)")
    parser.add_argument("--objects", type=int, default=4, help="at most this many objects at once (--world)")
    args = parser.parse_args()
    if args.world:
        path = write_world_clip(args.out, round(args.seconds), args.seed, args.objects)[0]
        print(path)
        for line in map(json.loads, path.with_suffix(".truth.jsonl").read_text().splitlines()):
            if "question" in line:
                print(f"  at {line['start']:g} s: {line['question']} (true answer: {line['answer']}); "
                      f"ask with --questions {path.with_suffix('.questions')}")
        return
    try:
        width, height = (int(side) for side in args.size.lower().split("x"))
    except ValueError:
        parser.error(f"--size must look like 320x240, got {args.size!r}")
    print(write_clip(args.out, args.seconds, width, height, args.fps))


if __name__ == "__main__":
    main()
