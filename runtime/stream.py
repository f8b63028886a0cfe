"""python -m runtime.stream VIDEO [--graphs graphs/NAME] [--out commentary.vtt] [options]

Streams a video through the exported graphs and writes one timed cue per chunk, flushed as it is produced, so
that an error, Ctrl-C or SIGTERM loses nothing already written. Bad input ends with a one-line error and exit
code 1. VIDEO is a file, a URL (rtsp, http(s), HLS, tcp, ...), - (stdin), pipe:N or a camera (/dev/video0); live
sources and --realtime are read at the live edge (runtime/live.py).
"""

import argparse
import json
import math
import signal
import sys
import threading
import time
from collections import deque
from pathlib import Path

from .context import Settings
from .manifest import Manifest, ManifestError
from .preprocess import smart_resize
from .engine import CacheFull
from .live import Arrival, LiveConfig, LiveEdge, Status, kind, live_chunks, redact
from .providers import PROVIDERS, ProviderError, choose, provider_options
from .sampling import Sampling
from .subtitles import FORMATS, CueWriter, clean_text, format_for
from .video import VideoError, read_chunks


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m runtime.stream", description="Live commentary for a video.")
    p.add_argument("video", help="a file, a URL, - (stdin), pipe:N or /dev/videoN")
    add_model_args(p)
    p.add_argument("--out", help="subtitle file, or - for stdout (default commentary.vtt)")
    p.add_argument("--format", choices=FORMATS, help="default: from the --out extension")
    p.add_argument("--query", default="Commentate on this match")
    p.add_argument("--previous-text", default="")
    p.add_argument("--system", default=None)
    p.add_argument("--timestamps", action="store_true", help="add Qwen3-VL's '<t seconds>' before each chunk")
    p.add_argument("--fps", type=float, default=2.0, help="frames per second fed to the model")
    p.add_argument("--chunk-duration", type=float, default=1.0, help="seconds per chunk")
    p.add_argument("--max-pixels", type=int, help="pixel budget per frame (default from the manifest)")
    p.add_argument("--window-size", type=int, default=16,
                   help="vision window: the last N chunks keep their frames' tokens (default 16)")
    p.add_argument("--text-round", type=int, default=16,
                   help="text rounds: the last N chunks keep their reply verbatim and their Time= text; older replies "
                        "move into the previous text (>= 2, default 16). A chunk's turn goes whole after the larger "
                        "of the two windows")
    p.add_argument("--text-sink", type=int, default=512)
    p.add_argument("--text-window", type=int, default=512)
    p.add_argument("--keep-query", action="store_true", help="pin the query instead of forgetting it")
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--questions", metavar="FILE",
                   help="questions, one per line, read while streaming (- for stdin): each joins the next chunk; a "
                        "line '@SECONDS question' joins the first chunk starting at or after that media time")
    p.add_argument("--answer-max-new-tokens", type=int, default=64, help="token budget of an answer (64)")
    p.add_argument("--temperature", type=float, default=0.9, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.05)
    p.add_argument("--seed", type=int)
    p.add_argument("--start", type=float, default=0.0, help="seconds into the video")
    p.add_argument("--duration", type=float, help="seconds to stream")
    p.add_argument("--realtime", action="store_true",
                   help="read a file as if it were live: paced by the wall clock, newest chunk first")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to open or read a network source (5)")
    p.add_argument("--reconnect", type=int, metavar="N",
                   help="reopen attempts after a live source fails (default: forever; files and pipes: never)")
    p.add_argument("--stats", help="write per-chunk timings as JSON lines to this file")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Where the graphs are and how they run: shared with the server (runtime/serve/)."""
    p.add_argument("--graphs", help="an export folder or its name under graphs/ (default: the only export there)")
    p.add_argument("--provider", default="auto", help="auto, migraphx, cuda or cpu (default auto)")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0 = all cores)")
    p.add_argument("--static", action=argparse.BooleanOptionalAction, default=None,
                   help="fixed-shape sessions and a device-resident KV cache (default: on for GPU providers)")
    p.add_argument("--cache-capacity", type=int, help="KV cache slots (default: derived from windows and frame size)")
    p.add_argument("--device-id", type=int, default=0)
    p.add_argument("--provider-fp16", action="store_true",
                   help="let MIGraphX convert the whole graph to fp16 (export DTYPE=fp16 instead keeps fp32 islands)")
    p.add_argument("--model-cache-dir", help="where MIGraphX keeps compiled programs (default ~/.cache/qwen3vl-stream)")
    p.add_argument("--exhaustive-tune", action="store_true", help="MIGraphX exhaustive tuning (slow first start)")
    p.add_argument("--provider-option", action="append", default=[], metavar="KEY=VALUE",
                   help="any other option of the provider, e.g. migraphx_mem_limit=8000000000")


QUESTION_TOKENS = 64  # a question is cut to this many tokens; the static cache reserves room for one per turn


class UsageError(Exception):
    pass


def find_graphs(given: str | None) -> Path:
    if given:  # a folder, or the name of an export under graphs/
        return Path(given) if Path(given).exists() or not (Path("graphs") / given).is_dir() else Path("graphs") / given
    found = sorted(p.parent for p in Path("graphs").glob("*/manifest.json"))
    if len(found) != 1:
        what = "no export" if not found else f"{len(found)} exports ({', '.join(p.name for p in found)})"
        raise UsageError(f"graphs/ holds {what}; pass --graphs graphs/NAME (make export MODEL=tiny makes one)")
    return found[0]


def config_from(args, questions: bool = False):
    """The stream's settings from parsed arguments; `questions`: leave room for questions asked mid-stream."""
    from .commentator import StreamConfig

    numbers = ("fps", "chunk_duration", "temperature", "top_p", "repetition_penalty", "timeout")
    if not all(math.isfinite(getattr(args, name)) for name in numbers):
        raise UsageError(f"--{', --'.join(n.replace('_', '-') for n in numbers)} must be finite numbers")
    for name in ("fps", "chunk_duration"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive")
    if args.text_round < 2 or args.window_size < 1 or min(args.max_new_tokens, args.answer_max_new_tokens) < 1:
        raise UsageError("--text-round must be >= 2, --window-size, --max-new-tokens and --answer-max-new-tokens "
                         ">= 1")
    if min(args.text_sink, args.text_window, args.top_k, args.temperature) < 0 or args.repetition_penalty <= 0:
        raise UsageError("--text-sink, --text-window, --top-k and --temperature must be >= 0, "
                         "--repetition-penalty > 0")
    if (args.cache_capacity is not None and args.cache_capacity < 1) or not 0 < args.top_p <= 1:
        raise UsageError("--cache-capacity must be positive and --top-p in (0, 1]")
    if args.timeout <= 0 or (args.reconnect is not None and args.reconnect < 0):
        raise UsageError("--timeout must be positive and --reconnect >= 0")
    settings = Settings(args.window_size, args.text_round, args.text_sink, args.text_window, args.keep_query)
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.repetition_penalty, args.seed)
    return StreamConfig(settings, sampling, args.max_new_tokens, args.query, args.previous_text, args.system,
                        args.timestamps, bool(args.static), args.cache_capacity,
                        QUESTION_TOKENS if questions else 0, args.answer_max_new_tokens)


def session_setup(args) -> tuple[list[str], dict]:
    providers = choose(args.provider)
    extra = {}
    for item in args.provider_option:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--provider-option {item!r} is not KEY=VALUE")
        extra[key] = value
    options = provider_options(providers[0], args.device_id, args.provider_fp16, args.model_cache_dir,
                               args.exhaustive_tune, extra)
    if args.static is None:  # GPUs keep the cache on the device; MIGraphX also compiles once per shape set
        args.static = providers[0] != PROVIDERS["cpu"]
    return providers, options


def chunking(args, manifest: Manifest) -> dict:
    """How the frames of `args.video` become chunks (keyword arguments of read_chunks and live_chunks)."""
    prep = manifest["preprocess"]
    factor = prep["patch_size"] * prep["merge_size"]

    def resize(height: int, width: int) -> tuple[int, int]:
        try:
            return smart_resize(height, width, factor, prep["min_pixels"], args.max_pixels or prep["max_pixels"])
        except ValueError as error:  # e.g. an aspect ratio over 200
            raise VideoError(f"{redact(args.video)}: {error}") from None

    return dict(resize=resize, chunk_duration=args.chunk_duration,
                frames_per_chunk=max(1, round(args.fps * args.chunk_duration)), start=args.start,
                duration=args.duration, min_side=prep["patch_size"])


def is_live(args) -> bool:
    """Read at the live edge (newest chunk first, drops counted): everything but a file without --realtime."""
    return kind(args.video) != "file" or args.realtime


def live_edge(args, manifest: Manifest, **options) -> LiveEdge:
    """The source of `args` read in its own thread (`options`: LiveEdge's keep_all and notify)."""
    config = LiveConfig(args.timeout, args.reconnect, args.realtime)
    return LiveEdge(lambda on_status, stop: live_chunks(args.video, config, on_status, stop,
                                                        **chunking(args, manifest)), **options)


class Questions:
    """Questions, one per line: a regular file is read before the first chunk (so that a script's questions meet
    their chunks), stdin or a pipe in a thread while the stream runs. `take` hands out the oldest unasked one that is
    due (each chunk takes at most one). A line "@SECONDS question" is due at the first chunk that starts at or after
    that media time (the same question meets the same chunk on every run); any other line is due at once."""

    def __init__(self, path: str):
        self._pending: deque[tuple[float, str]] = deque()
        if path != "-" and Path(path).is_file():
            with open(path, encoding="utf-8") as file:
                self._read(file)
        else:
            file = sys.stdin if path == "-" else open(path, encoding="utf-8")
            threading.Thread(target=self._read, args=(file,), name="questions", daemon=True).start()

    def _read(self, file) -> None:
        with file:
            for line in file:
                self._pending.append(timed(line))

    def take(self, start: float) -> str | None:
        while self._pending and not self._pending[0][1]:
            self._pending.popleft()
        if self._pending and self._pending[0][0] <= start + 1e-6:
            return self._pending.popleft()[1]
        return None


def timed(line: str) -> tuple[float, str]:
    """"@12.5 text" -> (12.5, "text"); a line without a time -> (-inf, the line)."""
    line = line.strip()
    head, _, rest = line.partition(" ")
    if head.startswith("@"):
        try:
            return float(head[1:]), rest.strip()
        except ValueError:
            pass
    return float("-inf"), line


def run(args) -> int:
    from .commentator import Commentator
    from .model import Model

    manifest = Manifest.load(find_graphs(args.graphs))
    providers, options = session_setup(args)
    if args.questions == "-" and args.video == "-":
        raise UsageError("stdin cannot carry both the video and the questions; pass --questions FILE")
    config = config_from(args, questions=bool(args.questions))
    out = args.out or "commentary.vtt"
    try:
        fmt = format_for(out, args.format)
    except ValueError as error:
        raise UsageError(str(error)) from None
    model = Model(manifest, providers, args.threads, options)
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    log(f"graphs {manifest.root} ({manifest['name']}, {manifest['dtype']}), "
        f"{'static shapes, device-resident cache' if config.static else 'dynamic shapes'} on {providers[0]}")

    commentator = Commentator(model, config)
    live = is_live(args)
    if live:  # decoding runs in its own thread; the commentator takes the newest chunk
        items = live_edge(args, manifest)
    else:  # a file, every chunk, as fast as possible
        items = (Arrival(chunk, 0.0, 0, 0.0) for chunk in read_chunks(args.video, **chunking(args, manifest)))
    questions = Questions(args.questions) if args.questions else None
    began, stats, processed = time.perf_counter(), None, 0
    with CueWriter(out, fmt) as writer:
        try:
            stats = open(args.stats, "w") if args.stats else None
            wait = time.perf_counter()
            for item in items:
                if isinstance(item, Status):
                    log(f"status: {item.line()}")
                    writer.status({"status": item.event, "source": item.source, **item.detail})
                    continue
                waited = time.perf_counter() - wait
                question = questions.take(item.chunk.start) if questions else None
                reply = commentator.step(item.chunk, question)
                processed += 1
                if processed == 1:  # sessions exist now: say where each graph runs
                    log(", ".join(f"{name} on {s.get_providers()[0]}" for name, s in model.sessions.items()))
                text = clean_text(reply.text)
                if question is not None:
                    log(f"[{_clock(reply.start)}] Q: {question!r}")
                if live:
                    lag = time.monotonic() - item.arrived  # from the chunk's last frame to its cue
                    writer.write(reply.start, reply.end, reply.text, {"lag": round(lag, 3), "dropped": item.dropped},
                                 question=question)
                    log(f"[{_clock(reply.start)}] {text!r}  (lag {lag:.2f} s, {item.dropped} dropped, "
                        f"{processed} chunks, cache {reply.cache_tokens} tokens)")
                    record = {"lag": lag, "dropped": item.dropped,
                              "seconds": {"decode_video": item.decode_seconds, "wait": waited, **reply.seconds}}
                else:
                    # the writer strips the trained " ..."
                    writer.write(reply.start, reply.end, reply.text, question=question)
                    elapsed = time.perf_counter() - began
                    video_seconds = reply.end - args.start
                    log(f"[{_clock(reply.start)}] {text!r}  ({reply.index + 1} chunks, "
                        f"{(reply.index + 1) / elapsed:.2f} chunks/s, real-time x{video_seconds / elapsed:.2f}, "
                        f"cache {reply.cache_tokens} tokens)")
                    record = {"seconds": {"decode_video": waited, **reply.seconds}}
                if stats:
                    stats.write(json.dumps({"chunk": reply.index, "cache_tokens": reply.cache_tokens, **record})
                                + "\n")
                    stats.flush()
                wait = time.perf_counter()
        finally:
            if stats:
                stats.close()
    log(f"wrote {out} ({fmt})")
    return 0


def _clock(seconds: float) -> str:
    return f"{int(seconds // 3600):02d}:{int(seconds % 3600 // 60):02d}:{seconds % 60:04.1f}"


def _terminate(signum, frame):
    raise KeyboardInterrupt  # SIGTERM ends the run like Ctrl-C: the cues written so far are kept


def main(argv=None) -> int:
    args = parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return run(args)
    except (VideoError, ManifestError, ProviderError, UsageError, CacheFull) as error:
        print(f"error: {redact(str(error))}", file=sys.stderr)  # credentials in a URL never reach output
        return 1
    except OSError as error:  # a file that cannot be read or written (output, stats, artifacts)
        print(f"error: {error.filename or 'file'}: {error.strerror or error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; the cues written so far are kept", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
