"""Batched decoding (runtime/batch.py): streams that share each decoder call get exactly what they get alone.

Four streams of different frame sizes, windows, start times and questions, on the host path and on the static
path (a device-resident cache written in place, on the CPU provider): with greedy decoding every reply's tokens are
identical to the same stream run alone, and every logit vector (after each prefill and each decode step) is within
1e-5; with sampling, a stream's seed gives the same replies batched or not."""

import numpy as np
import pytest

from runtime.batch import Batch, runs
from runtime.commentator import Commentator, StreamConfig
from runtime.context import Settings
from runtime.manifest import Manifest
from runtime.model import Model
from runtime.sampling import Sampling
from runtime.video import Chunk

SIZES = [(64, 64), (96, 128), (64, 64), (128, 96)]  # frame size per stream
STARTS = [0, 1, 1, 3]  # the tick each stream joins at
QUESTIONS = {1: {2: "what moved?"}, 3: {0: "what is there?", 4: "and now?"}}  # stream -> chunk -> question
CHUNKS = 8


def config(k: int, static: bool, sampling: Sampling) -> StreamConfig:
    windows = Settings(window_size=2 + k, text_round=3, text_sink=8, text_window=8)
    return StreamConfig(settings=windows, sampling=sampling, max_new_tokens=6, answer_max_new_tokens=8,
                        question_tokens=16, static=static, cache_capacity=1500 if static else None)


def frames() -> list[list[np.ndarray]]:
    rng = np.random.default_rng(0)
    return [[rng.integers(0, 255, (2, h, w, 3), dtype=np.uint8) for _ in range(CHUNKS)] for h, w in SIZES]


def alone(model, k: int, static: bool, sampling: Sampling, video) -> list[tuple[list[int], list[np.ndarray]]]:
    """Each chunk's reply tokens and every logit vector, the stream served by itself (one decode step per call)."""
    commentator, out = Commentator(model, config(k, static, sampling)), []
    for i in range(CHUNKS):
        turn, seen = commentator.turn(Chunk(i, i, i + 1, video[i]), QUESTIONS.get(k, {}).get(i)), []
        try:
            step = next(turn)
            while True:
                seen.append(step.alone())
                step = turn.send(seen[-1])
        except StopIteration as done:
            out.append((done.value.tokens, [done.value.logits, *seen]))
    commentator.close()
    return out


def batched(model, static: bool, sampling: Sampling, video) -> tuple[list, Batch]:
    """The four streams together: each tick, every stream due starts its chunk (vision, prefill), then all of
    them decode in batched steps until each reply ends."""
    batch = Batch(model, static=static, streams=4)
    commentators = [Commentator(model, config(k, static, sampling), batch) for k in range(4)]
    out = [[] for _ in range(4)]
    for tick in range(CHUNKS + max(STARTS)):
        turns, pending, seen = {}, {}, {}
        for k, commentator in enumerate(commentators):
            i = tick - STARTS[k]
            if 0 <= i < CHUNKS:
                turns[k], seen[k] = commentator.turn(Chunk(i, i, i + 1, video[k][i]), QUESTIONS.get(k, {}).get(i)), []
                try:
                    pending[k] = next(turns[k])
                except StopIteration as done:
                    out[k].append((done.value.tokens, [done.value.logits]))
        while pending:
            streams = list(pending)
            for k, logits in zip(streams, batch.decode([pending[k] for k in streams])):
                seen[k].append(logits)
                try:
                    pending[k] = turns[k].send(logits)
                except StopIteration as done:
                    out[k].append((done.value.tokens, [done.value.logits, *seen[k]]))
                    del pending[k]
    for commentator in commentators:
        commentator.close()
    return out, batch


@pytest.mark.parametrize("static", [False, True], ids=["host", "static"])
def test_batched_streams_equal_each_stream_alone(tiny_graphs, static):
    model, video, greedy = Model(Manifest.load(tiny_graphs)), frames(), Sampling(temperature=0)
    together, batch = batched(model, static, greedy, video)
    assert batch.rows_decoded > 1.5 * batch.steps  # the streams really shared calls
    worst = 0.0
    for k in range(4):
        single = alone(model, k, static, greedy, video[k])
        assert [tokens for tokens, _ in together[k]] == [tokens for tokens, _ in single]
        for (_, a), (_, b) in zip(together[k], single):
            assert len(a) == len(b)
            worst = max(worst, *(float(np.abs(x - y).max()) for x, y in zip(a, b)))
    assert worst < 1e-5, worst
    assert any(tokens for reply in together for tokens, _ in reply)  # the replies are not all empty


def test_a_seed_gives_the_same_replies_batched_or_not(tiny_graphs):
    model, video = Model(Manifest.load(tiny_graphs)), frames()
    # top-k, not top-p: the random tiny model's distribution is nearly flat over 151k ids, so a top-p cut moves with
    # the last bits of the logits, which a batched call may round differently; among 5 candidates it does not
    sampling = Sampling(temperature=0.9, top_k=5, seed=3)
    together, _ = batched(model, False, sampling, video)
    for k in range(4):
        assert [t for t, _ in together[k]] == [t for t, _ in alone(model, k, False, sampling, video[k])]


def test_rows_are_reused_and_runs_waste_no_more_than_they_serve(tiny_graphs):
    assert runs([0, 1, 2, 3], 8) == [[0, 1, 2, 3]]
    assert runs([0, 2, 3], 8) == [[0, 2, 3]]  # one padded row for three served
    assert runs([0, 5, 6], 8) == [[0], [5, 6]]  # four padded rows would serve three
    assert runs(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]  # at most the largest bucket
    model = Model(Manifest.load(tiny_graphs))
    batch = Batch(model)
    first = Commentator(model, config(0, False, Sampling(temperature=0)), batch)
    second = Commentator(model, config(1, False, Sampling(temperature=0)), batch)
    video = frames()
    first.step(Chunk(0, 0, 1, video[0][0]))
    second.step(Chunk(0, 0, 1, video[1][0]))
    rows = batch.host_rows(1)
    assert (first.engine.row, second.engine.row) == (0, 1) and rows.taken == [True, True]
    buffers = [id(b) for b in rows.keys]
    first.step(Chunk(1, 1, 2, video[0][1]))
    assert [id(b) for b in rows.keys] == buffers  # steady state: the shared cache is never reallocated
    first.close()
    third = Commentator(model, config(2, False, Sampling(temperature=0)), batch)
    third.step(Chunk(0, 0, 1, video[2][0]))
    assert third.engine.row == 0  # the freed row went to the next stream


def test_the_batched_host_decoder_packs_its_weights_and_no_session_spins(tiny_graphs):
    """Shared fp32 weights are used unpacked (one copy for every session) until a Batch needs decode calls of many
    rows, which ONNX Runtime's SGEMM would otherwise repack on every call (README "Batching"); idle pool threads
    sleep (spinning took the cores from the video readers)."""
    def entry(session, key):
        try:
            return session.get_session_options().get_session_config_entry(key)
        except RuntimeError:  # not set: ONNX Runtime's default
            return None

    model = Model(Manifest.load(tiny_graphs))
    assert entry(model.session("decoder"), "session.disable_prepacking") == "1"
    Batch(model)
    assert entry(model.session("decoder"), "session.disable_prepacking") is None
    assert entry(model.session("prefill"), "session.disable_prepacking") == "1"
    assert entry(model.session("decoder", {"batch": 2, "past": 8, "new": 1}), "session.disable_prepacking") == "1"
    assert all(entry(s, "session.intra_op.allow_spinning") == "0" for s in model._sessions.values())
