"""End to end: a synthetic clip through the streaming runtime and through the PyTorch streaming reference."""

import time
from pathlib import Path

from runtime.commentator import Commentator, StreamConfig
from runtime.preprocess import smart_resize
from runtime.sample import write_clip
from runtime.sampling import Sampling
from runtime.video import read_chunks

GREEDY = Sampling(temperature=0)
FRAME = (320, 180)  # upscaled by smart_resize to 448x256 = 112 vision tokens per chunk (the 100-token minimum)
SECONDS = {"tiny": (600, 60), "wide": (30, 8), "wide_int4": (30, 0)}  # (ONNX clip, PyTorch reference clip)
QUICK_SECONDS = {"tiny": (4, 3), "wide": (4, 3), "wide_int4": (4, 0)}  # 0: no reference (the fp32 row has it)


def _chunks(model, clip: Path, seconds: float):
    prep = model.manifest["preprocess"]
    factor = prep["patch_size"] * prep["merge_size"]
    return read_chunks(clip, resize=lambda h, w: smart_resize(h, w, factor, prep["min_pixels"], prep["max_pixels"]),
                       duration=seconds)


def end_to_end(exports: dict, threads: int, quick: bool = False) -> dict:
    from tokenizers import Tokenizer

    from .torch_stream import ReferenceStream

    out = {}
    for name, seconds in (QUICK_SECONDS if quick else SECONDS).items():
        bench_model = exports[name]
        model = bench_model.model(threads)
        clip = write_clip(Path("build/bench") / f"clip-{seconds[0]}s.mp4", seconds[0], *FRAME, fps=10)
        commentator = Commentator(model, StreamConfig(sampling=GREEDY))
        stages, start, chunks = {}, time.perf_counter(), 0
        for chunk in _chunks(model, clip, seconds[0]):
            reply = commentator.step(chunk)
            chunks += 1
            for stage, value in reply.seconds.items():
                stages[stage] = stages.get(stage, 0.0) + value
        wall = time.perf_counter() - start
        onnx = {"rtf": chunks / wall, "chunks": chunks, "cache_tokens": reply.cache_tokens,
                "seconds_per_stage": {k: v / chunks for k, v in stages.items()}}

        out[name] = {"setup": {**bench_model.describe(), "video_seconds": seconds[0], "frame": list(FRAME),
                               "threads": threads, "windows": "16/16/512/512", "max_new_tokens": 20,
                               "sampling": "greedy"}, "onnx": onnx}
        if not seconds[1]:
            continue
        hf = bench_model.hf_model()
        tokenizer = Tokenizer.from_file(str(model.manifest.path("tokenizer") / "tokenizer.json"))
        reference = ReferenceStream(hf, tokenizer, model.manifest, window_size=16, text_round=16, text_sink=512,
                                    text_window=512, repetition_penalty=1.05)
        start, done = time.perf_counter(), 0
        for chunk in _chunks(model, clip, seconds[1]):
            reference.step(chunk)
            done += 1
        torch_wall = time.perf_counter() - start
        out[name]["setup"]["torch_video_seconds"] = seconds[1]
        out[name]["torch"] = {"rtf": done / torch_wall, "chunks": done}
        del hf, reference
    return out
