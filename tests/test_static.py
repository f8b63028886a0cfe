"""The AMD path on the CPU provider: fixed-shape sessions, a device-resident cache written in place through IO
binding, equal to the dynamic path; host transfers per step bounded by the new tokens, not the cache."""

import numpy as np
import pytest

from conftest import cli
from runtime.commentator import Commentator, StreamConfig
from runtime.context import Settings
from runtime.manifest import Manifest
from runtime.model import Model
from runtime.sample import write_clip
from runtime.sampling import Sampling
from test_stream import chunks_of, lossless_clip

GREEDY = Sampling(temperature=0, repetition_penalty=1.05)
WINDOWS = Settings(window_size=3, text_round=4, text_sink=6, text_window=10)


def test_static_sessions_equal_the_dynamic_path(tiny_graphs, tmp_path):
    manifest = Manifest.load(tiny_graphs)
    chunks = chunks_of(manifest, lossless_clip(tmp_path / "clip.mkv", 24, fps=4))
    dynamic = Commentator(Model(manifest), StreamConfig(WINDOWS, GREEDY, max_new_tokens=6))
    static = Commentator(Model(manifest), StreamConfig(WINDOWS, GREEDY, max_new_tokens=6, static=True))
    for chunk in chunks:
        a, b = dynamic.step(chunk), static.step(chunk)
        assert a.tokens == b.tokens, f"chunk {chunk.index}"
        assert np.abs(a.logits - b.logits).max() < 1e-5
    # one session per fixed shape set, every input dim static, and nothing else was ever made
    sessions = static.model._sessions
    assert sorted(graph for graph, _ in sessions) == ["cache_rope", "cache_write", "cache_write", "decoder", "prefill",
                                                      "vision"]
    for session in sessions.values():
        assert all(isinstance(d, int) for i in session.get_inputs() for d in i.shape), session.get_inputs()


def _bytes_per_decode_step(manifest, chunk, capacity):
    commentator = Commentator(Model(manifest), StreamConfig(WINDOWS, GREEDY, max_new_tokens=8, static=True,
                                                            cache_capacity=capacity))
    commentator.step(chunk)
    engine = commentator.engine
    embeds = np.zeros((1, engine.model.hidden), np.float32)
    deepstack = np.zeros((engine.model.n_deepstack, 1, engine.model.hidden), np.float32)
    steps = []
    for k in range(4):
        before = engine.host_bytes
        engine.run(embeds, deepstack, np.full((3, 1), 500 + k, np.int64), engine.pool.allocate(1))
        steps.append(engine.host_bytes - before)
    return steps


def test_host_transfers_per_step_do_not_grow_with_the_cache(tiny_graphs, tmp_path):
    manifest = Manifest.load(tiny_graphs)
    chunk = chunks_of(manifest, lossless_clip(tmp_path / "clip.mkv", 1))[0]
    small, large = (_bytes_per_decode_step(manifest, chunk, capacity) for capacity in (400, 4000))
    vocab, hidden = manifest["text"]["vocab_size"], manifest["text"]["hidden_size"]
    # the token's inputs, its slot and the logits: the vocabulary plus a few KB, whatever the cache holds
    assert small == large == [small[0]] * 4
    assert small[0] < 4 * vocab + 32 * hidden + 512


def test_a_cache_too_small_for_the_windows_is_a_one_line_error(tiny_graphs, tmp_path):
    clip = write_clip(tmp_path / "clip.mp4", 3, 96, 64, 10)
    result = cli("-m", "runtime.stream", str(clip), "--graphs", str(tiny_graphs), "--static", "--cache-capacity",
                 "150", "--out", str(tmp_path / "o.vtt"), "--quiet")
    assert result.returncode == 1 and "--cache-capacity" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["--provider-option", "bogus=1"], "unknown cpu provider option bogus"),
    (["--device-id", "1"], "need a GPU provider"),
    (["--provider", "cuda"], "onnxruntime-gpu"),
])
def test_provider_options_are_checked(tiny_graphs, tmp_path, args, message):
    clip = write_clip(tmp_path / "clip.mp4", 1, 96, 64, 10)
    result = cli("-m", "runtime.stream", str(clip), "--graphs", str(tiny_graphs), *args, "--quiet",
                 "--out", str(tmp_path / "o.vtt"))
    assert result.returncode == 1 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
