"""The built-in micro model: its world, its folder, its export, and whether its commentary is right.

The accuracy tests run the exported graphs through the runtime (ONNX Runtime, no PyTorch, default StreamingVLM
windows, greedy) on world seeds never used in training (< 1,000,000): a 10-minute stream (600 chunks: the vision
window, the text rounds and the previous-text trimming each act hundreds of times) must be >= 90% exact, its last
minute as good as its first within binomial noise, and frames shuffled across chunks must score near chance.
"""

import json
import math

import numpy as np
import pytest

from runtime.world import COLOURS, EVENTS, SHAPES, SIZE, Event, World, events, parse_caption, render

from conftest import ROOT, cli
from runtime.manifest import Manifest
from runtime.model import Model

FOLDER = ROOT / "export" / "presets" / "micro"


def test_world_is_seeded_and_speaks_a_closed_language():
    a, b = list(World(5).chunks(50)), list(World(5).chunks(50))
    assert all(np.array_equal(x[0], y[0]) and x[1] == y[1] for x, y in zip(a, b))
    assert [e for _, e in a] == events(5, 50)
    assert [e for _, e in World(5, noise=4.0).chunks(50)] == events(5, 50)  # noise never changes the events
    assert a[0][0].shape == (2, SIZE, SIZE, 3) and a[0][0].dtype == np.uint8
    for frames, event in a:  # the two frames differ exactly when something happens
        assert np.array_equal(frames[0], frames[1]) == (event.kind == "nothing")
    for kind in EVENTS:
        for colour in COLOURS:
            for shape in SHAPES:
                event = Event(kind, colour, shape) if kind != "nothing" else Event("nothing")
                assert parse_caption(event.caption()) == event
    assert parse_caption("the red circle moves sideways") is None
    # the three shapes of one colour are three different pictures
    from runtime.world import Thing
    pictures = [render([Thing("red", s, 1, 1)]) for s in SHAPES]
    assert len({p.tobytes() for p in pictures}) == 3
    kinds = {e.kind for e in events(1, 2000)}
    assert kinds == set(EVENTS)


def test_folder_is_an_ordinary_hugging_face_folder():
    """Special ids, vocabulary size and stop tokens come from the folder, and fit in 5 MB."""
    names = {p.name for p in FOLDER.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
            "preprocessor_config.json", "video_preprocessor_config.json"} <= names
    assert sum(p.stat().st_size for p in FOLDER.iterdir()) < 5 * 2**20
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(FOLDER / "tokenizer.json"))
    config = json.loads((FOLDER / "config.json").read_text())
    assert tokenizer.token_to_id("<|video_pad|>") == config["video_token_id"]
    assert tokenizer.token_to_id("<|vision_start|>") == config["vision_start_token_id"]
    assert tokenizer.get_vocab_size() <= config["text_config"]["vocab_size"] < 151643  # not Qwen's
    text = "the red circle moves left ..."
    assert tokenizer.decode(tokenizer.encode(text).ids) == text


def test_checkpoint_pixel_bounds_only_when_declared():
    """The micro folder declares per-frame min/max pixels (128x128 stays 128x128); Qwen presets keep StreamingVLM's
    100..768 merged tokens."""
    from export.artifacts import _preprocess
    from export.load import resolve

    micro, tiny = resolve("micro"), resolve("tiny")
    assert _preprocess(micro, micro.config.vision_config)["min_pixels"] == SIZE * SIZE
    assert _preprocess(micro, micro.config.vision_config)["max_pixels"] == SIZE * SIZE
    bounds = _preprocess(tiny, tiny.config.vision_config)
    assert (bounds["min_pixels"], bounds["max_pixels"], bounds["pixel_bounds"]) == (100 * 1024, 768 * 1024,
                                                                                    "StreamingVLM")


def test_training_examples_are_the_runtime_layout():
    """A training example deep into a stream holds what the runtime holds: 16 rounds with frames, a previous text
    trimmed to sink + window, positions without gaps; its targets are exactly the retained replies."""
    from export.micro import Conversations

    data = Conversations(FOLDER)
    example = data.example(np.random.default_rng(0), 3, 700, 4, 0.0)
    p = data.prompter
    text = p.decode(example["tokens"])
    assert text.count("Time=") == 16 and "Time=700.0-701.0s" in text and "Time=685.0-686.0s" in text
    assert "Commentate" not in text  # the first turn's query went with its turn
    assert len(example["frames"]) == 16
    previous_end = int(np.flatnonzero(example["tokens"] == p.ids["im_end"])[0])
    assert previous_end - len(p.head()) == 1024  # sink 512 + window 512
    assert np.all(np.diff(example["positions"][0]) >= 0)
    wanted = np.concatenate([[*data.reply_ids(e), p.ids["im_end"]] for e in example["events"]])
    assert np.array_equal(example["tokens"][example["target"] == 1], wanted)


def _z(first: int, last: int, n: int) -> float:
    """Two-proportion z statistic of last minus first (pooled)."""
    p = (first + last) / (2 * n)
    return 0.0 if p in (0, 1) else (last - first) / n / math.sqrt(p * (1 - p) * 2 / n)


def test_ten_minute_stream_is_right_from_first_to_last_minute(micro_graphs):
    from runtime.accuracy import paired, report, score, stream

    model = Model(Manifest.load(micro_graphs), threads=2)
    pairs = stream(model, seed=11, seconds=600)
    fresh = stream(model, seed=11, seconds=60, start=540)  # the same last minute, empty context
    table = report(pairs, fresh=fresh)
    print(json.dumps(table, indent=1))
    assert table["stream"]["exact"] >= 0.90, table["stream"]
    first, last = score(pairs[:60]), score(pairs[-60:])
    # the last minute is not worse than the first beyond binomial noise (one-sided, 1%) ...
    assert _z(first.exact, last.exact, 60) > -2.33, table
    assert table["last_minute"]["exact"] >= 0.80, table
    # ... nor than the same minute streamed without the 9 minutes before it (paired: same frames, same captions)
    worse, better, p = paired(pairs[-60:], fresh)
    assert p > 0.01, (worse, better, table)


def test_shuffled_frames_score_near_chance(micro_graphs):
    """The control: each chunk fed another chunk's frames. A model that ignored its frames would pass the test
    above on caption priors; it cannot pass this one."""
    from runtime.accuracy import score, stream

    model = Model(Manifest.load(micro_graphs), threads=2)
    shuffled = score(stream(model, seed=12, seconds=120, shuffle=True)).row()
    assert shuffled["exact"] < 0.25 and shuffled["event"] < 0.4, shuffled


def test_demo_clip_through_the_cli(micro_graphs, tmp_path):
    """What `make demo` does: a world clip through H.264 and the stream CLI; the cues match the true captions."""
    clip = tmp_path / "world.mp4"
    run = cli("-m", "runtime.sample", str(clip), "--world", "--seconds", "20", "--seed", "3")
    assert run.returncode == 0, run.stderr
    out = tmp_path / "cues.jsonl"
    run = cli("-m", "runtime.stream", str(clip), "--graphs", str(micro_graphs), "--out", str(out),
              "--temperature", "0", "--threads", "2", "--quiet")
    assert run.returncode == 0, run.stderr
    said = [json.loads(line) for line in out.read_text().splitlines()]
    truth = [json.loads(line) for line in clip.with_suffix(".truth.jsonl").read_text().splitlines()]
    assert [c["start"] for c in said] == [c["start"] for c in truth]
    right = sum(parse_caption(s["text"]) == parse_caption(t["text"]) for s, t in zip(said, truth))
    assert right >= 0.8 * len(truth), list(zip(said, truth))
