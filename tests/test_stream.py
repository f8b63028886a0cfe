"""The streaming runtime: equal to transformers without eviction, equal to a PyTorch reference with eviction,
runs without torch, and turns bad input into one-line errors while keeping what it already wrote."""

import json
import os

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from conftest import cli
from bench.torch_stream import ReferenceStream
from runtime.commentator import Commentator, StreamConfig
from runtime.context import Settings
from runtime.manifest import Manifest
from runtime.model import Model
from runtime.preprocess import patchify, smart_resize
from runtime.prompt import Prompter
from runtime.sample import write_clip
from runtime.sampling import Sampling
from runtime.subtitles import parse_srt, parse_vtt
from runtime.video import read_chunks

GREEDY = Sampling(temperature=0, repetition_penalty=1.05)


def lossless_clip(path, seconds, width=128, height=96, fps=10):
    return write_clip(path, seconds, width, height, fps, codec="ffv1", pix_fmt="bgr0")


def chunks_of(manifest, clip, **kwargs):
    prep = manifest["preprocess"]
    factor = prep["patch_size"] * prep["merge_size"]
    return list(read_chunks(clip, resize=lambda h, w: smart_resize(h, w, factor, prep["min_pixels"],
                                                                   prep["max_pixels"]), **kwargs))


@pytest.fixture(scope="module")
def hf_tiny():
    from export.load import resolve

    return resolve("tiny").build_model()  # the same seed as the export: the same weights


def test_without_eviction_every_chunk_equals_generate(tiny_graphs, hf_tiny, tmp_path):
    """Windows larger than the video, greedy: each chunk's reply is what generate() gives on the conversation
    built turn by turn from the same prompt strings and the same pixels."""
    manifest = Manifest.load(tiny_graphs)
    chunks = chunks_of(manifest, lossless_clip(tmp_path / "clip.mkv", 5))
    max_new = 12
    commentator = Commentator(Model(manifest), StreamConfig(Settings(100, 100, 512, 512), GREEDY, max_new,
                                                            previous_text="Earlier: kick-off."))
    tok = Tokenizer.from_file(str(tiny_graphs / "tokenizer" / "tokenizer.json"))
    ids, prep = manifest["tokens"], manifest["preprocess"]

    def enc(text):
        return tok.encode(text, add_special_tokens=False).ids

    conversation = enc("<|im_start|>previous text\nEarlier: kick-off.<|im_end|>\n")
    pixels, grids = [], []
    for chunk in chunks:
        reply = commentator.step(chunk)
        patches = patchify(chunk.frames, prep["patch_size"], prep["temporal_patch_size"], prep["merge_size"],
                           prep["image_mean"], prep["image_std"], prep["rescale_factor"])
        gh, gw = chunk.frames.shape[1] // prep["patch_size"], chunk.frames.shape[2] // prep["patch_size"]
        pads = "<|video_pad|>" * (gh * gw // 4)
        query = "Commentate on this match" if chunk.index == 0 else ""
        turn = f"<|im_start|>user\nTime={chunk.start:.1f}-{chunk.end:.1f}s<|vision_start|>{pads}<|vision_end|>"
        conversation += enc(("\n" if chunk.index else "") + turn + f"{query}<|im_end|>\n<|im_start|>assistant\n")
        pixels.append(patches.reshape(-1, patches.shape[-1]))
        grids.append([1, gh, gw])
        input_ids = torch.tensor([conversation])
        with torch.no_grad():
            out = hf_tiny.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                   pixel_values_videos=torch.from_numpy(np.concatenate(pixels)),
                                   video_grid_thw=torch.tensor(grids),
                                   mm_token_type_ids=(input_ids == ids["video_pad"]).long() * 2,
                                   max_new_tokens=max_new, do_sample=False, repetition_penalty=1.05,
                                   eos_token_id=manifest["stop_tokens"], pad_token_id=ids["endoftext"],
                                   output_logits=True, return_dict_in_generate=True)
        assert np.abs(reply.logits - out.logits[0][0].numpy()).max() < 1e-5  # the prefill, at fp32 level
        expected = out.sequences[0, len(conversation):].tolist()
        if expected and expected[-1] in manifest["stop_tokens"]:
            expected = expected[:-1]
        assert reply.tokens == expected, f"chunk {chunk.index}"
        conversation += expected + [ids["im_end"]]


@pytest.mark.parametrize("timestamps", [False, True])
def test_a_user_turn_cut_for_eviction_has_the_ids_of_the_whole_string(tiny_graphs, timestamps):
    prompter = Prompter(Manifest.load(tiny_graphs), None, "", "Commentate on this match", timestamps)
    for start in (0.0, 7.5, 123.0, 35999.0):
        pieces = prompter.user_turn(start, start + 1, 6, 2, start == 0)
        stamp = f"<{start + 0.5:.1f} seconds>" if timestamps else ""
        query = "Commentate on this match" if start == 0 else ""
        whole = (f"<|im_start|>user\nTime={start:.1f}-{start + 1:.1f}s{stamp}<|vision_start|>{'<|video_pad|>' * 12}"
                 f"<|vision_end|>{query}<|im_end|>\n")
        assert np.concatenate([ids for _, ids, _ in pieces]).tolist() == prompter.encode(whole).tolist()
        assert [kind for kind, _, patch in pieces if patch] == ["vision", "vision"]


@pytest.mark.parametrize("windows", [dict(window_size=2, text_round=5, text_sink=6, text_window=10),
                                     dict(window_size=3, text_round=3, text_sink=6, text_window=10),
                                     dict(window_size=5, text_round=2, text_sink=6, text_window=10)],
                         ids=["vision-window-smaller", "equal", "vision-window-larger"])
def test_with_eviction_onnx_equals_the_pytorch_reference(tiny_graphs, hf_tiny, tmp_path, windows):
    """Small windows so that folding, dropping vision blocks, Time= texts and whole turns, and trimming each run
    dozens of times over 48 chunks, in all three cases of the vision window against the text rounds."""
    manifest = Manifest.load(tiny_graphs)
    chunks = chunks_of(manifest, lossless_clip(tmp_path / "long.mkv", 48, fps=4))
    assert len(chunks) == 48
    commentator = Commentator(Model(manifest), StreamConfig(Settings(**windows), GREEDY, max_new_tokens=6))
    tok = Tokenizer.from_file(str(tiny_graphs / "tokenizer" / "tokenizer.json"))
    reference = ReferenceStream(hf_tiny, tok, manifest, max_new_tokens=6, **windows)
    errors, sizes = [], []
    for chunk in chunks:
        reply = commentator.step(chunk)
        assert reply.tokens == reference.step(chunk), f"chunk {chunk.index}"
        assert commentator.context.tokens().tolist() == [t.id for t in reference.seq], f"chunk {chunk.index}"
        errors.append(float(np.abs(reply.logits - reference.prefill_logits[-1]).max()))
        sizes.append(reply.cache_tokens)
    assert max(errors) < 1e-5, errors  # fp32 level
    assert max(errors[-16:]) < 10 * max(errors[:16]) + 1e-6, errors  # no drift over time
    assert max(sizes[32:]) == max(sizes[16:32])  # the cache stopped growing


BLOCK_TORCH = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'transformers'):
            raise ImportError('blocked at serve time: ' + name)
sys.meta_path.insert(0, Block())
sys.argv = ['runtime.stream'] + sys.argv[1:]
import runpy
runpy.run_module('runtime.stream', run_name='__main__')
"""


def test_streams_without_torch_and_writes_valid_subtitles(tiny_graphs, tmp_path):
    clip = write_clip(tmp_path / "clip.mp4", 4, 160, 120, 25)
    vtt, srt, jsonl = tmp_path / "c.vtt", tmp_path / "c.srt", tmp_path / "c.jsonl"
    for out in (vtt, srt, jsonl):
        result = cli("-c", BLOCK_TORCH, str(clip), "--graphs", str(tiny_graphs), "--out", str(out), "--seed", "1",
                     "--stats", str(tmp_path / "stats.jsonl"))
        assert result.returncode == 0, result.stderr
    assert "decoder on CPUExecutionProvider" in result.stderr and "real-time" in result.stderr
    assert len(parse_vtt(vtt.read_text())) == len(parse_srt(srt.read_text())) <= 4
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [(c["start"], c["end"]) for c in lines] == [(0.0, 1.0), (1.0, 2.0), (2.0, 3.0), (3.0, 4.0)]
    stats = [json.loads(line) for line in (tmp_path / "stats.jsonl").read_text().splitlines()]
    assert set(stats[0]["seconds"]) == {"decode_video", "preprocess", "vision", "prefill", "decode"}


def test_sampling_is_reproducible_with_a_seed(tiny_graphs, tmp_path):
    clip = write_clip(tmp_path / "clip.mp4", 3, 160, 120, 25)
    runs = [cli("-m", "runtime.stream", str(clip), "--graphs", str(tiny_graphs), "--out", "-", "--seed", str(seed),
                "--quiet") for seed in (5, 5, 6)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr
    assert runs[0].stdout == runs[1].stdout != runs[2].stdout
    assert len(runs[0].stdout.splitlines()) == 3


def _bad_inputs(tmp_path, tiny_graphs):
    (tmp_path / "text.mp4").write_text("not a video\n" * 100)
    good = write_clip(tmp_path / "good.mkv", 3, 64, 48, 10, codec="ffv1", pix_fmt="bgr0")
    (tmp_path / "truncated.mp4").write_bytes(write_clip(tmp_path / "t.mp4", 3, 64, 48, 10).read_bytes()[:3000])
    tiny = write_clip(tmp_path / "tiny.mkv", 1, 8, 8, 10, codec="ffv1", pix_fmt="bgr0")
    import av

    with av.open(str(tmp_path / "audio.m4a"), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    with av.open(str(tmp_path / "empty.avi"), "w") as container:
        container.add_stream("mpeg4", rate=10)
        container.start_encoding()
    stale = tmp_path / "stale"
    stale.mkdir()
    manifest = json.loads((tiny_graphs / "manifest.json").read_text())
    (stale / "manifest.json").write_text(json.dumps({**manifest, "format_version": 0}))
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_graphs, damaged)
    graph = bytearray((damaged / "decoder.onnx").read_bytes())
    graph[64:4096] = bytes(4032)  # same size, so only loading it can tell
    (damaged / "decoder.onnx").write_bytes(bytes(graph))
    return {
        "missing": ([str(tmp_path / "nope.mp4")], "no such file"),
        "not a video": ([str(tmp_path / "text.mp4")], "not a readable video"),
        "truncated": ([str(tmp_path / "truncated.mp4")], "truncated"),
        "audio only": ([str(tmp_path / "audio.m4a")], "no video stream"),
        "zero frames": ([str(tmp_path / "empty.avi")], "no video frame"),
        "tiny frames": ([str(tiny)], "smaller than"),
        "no graphs": ([str(good), "--graphs", str(tmp_path)], "missing manifest.json"),
        "old graphs": ([str(good), "--graphs", str(stale)], "export again"),
        "no provider": ([str(good), "--provider", "migraphx"], "onnxruntime-migraphx"),
        "damaged graph": ([str(good), "--graphs", str(damaged)], "cannot load"),
        "bad format": ([str(good), "--out", str(tmp_path / "x.txt")], "vtt"),
        "unwritable output": ([str(good), "--out", str(tmp_path / "no" / "such" / "dir.vtt")], "No such file"),
    }


def test_bad_input_is_a_one_line_error(tiny_graphs, tmp_path):
    for name, (args, message) in _bad_inputs(tmp_path, tiny_graphs).items():
        if "--graphs" not in args:
            args = [*args, "--graphs", str(tiny_graphs)]
        result = cli("-m", "runtime.stream", *args, "--out", str(tmp_path / "o.vtt"), "--quiet") \
            if "--out" not in args else cli("-m", "runtime.stream", *args, "--quiet")
        assert result.returncode == 1, (name, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (name, result.stderr)


def test_cues_written_before_a_mid_stream_error_are_kept(tiny_graphs, tmp_path):
    clip = write_clip(tmp_path / "clip.mkv", 12, 64, 48, 10, codec="ffv1", pix_fmt="bgr0")
    data = bytearray(clip.read_bytes())
    rng = np.random.default_rng(0)
    middle = len(data) * 2 // 3
    data[middle:middle + 4000] = rng.integers(0, 256, 4000, dtype=np.uint8).tobytes()
    clip.write_bytes(bytes(data))
    out = tmp_path / "partial.vtt"
    result = cli("-m", "runtime.stream", str(clip), "--graphs", str(tiny_graphs), "--out", str(out), "--quiet")
    cues = parse_vtt(out.read_text())
    assert result.returncode == 1 and "damaged" in result.stderr and "Traceback" not in result.stderr
    assert len(cues) >= 3  # the seconds before the damage were commented and kept


def test_graphs_are_found_when_there_is_exactly_one(tiny_graphs, tmp_path):
    (tmp_path / "graphs").mkdir()
    os.symlink(tiny_graphs, tmp_path / "graphs" / "tiny")
    clip = write_clip(tmp_path / "clip.mp4", 2, 96, 64, 10)
    result = cli("-m", "runtime.stream", str(clip), "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(parse_vtt((tmp_path / "commentary.vtt").read_text())) <= 2
