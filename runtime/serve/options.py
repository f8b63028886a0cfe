"""The server's command line, the sources it lets clients open, and what one stream may ask of it."""

import argparse

from .. import stream as cli
from ..live import kind

# Per-stream settings a client may give, with their JSON types (the CLI's options of the same names).
NUMBER = (int, float)
MAX_FRAMES_PER_CHUNK, MAX_NEW_TOKENS = 16, 512  # per stream, whatever a client asks
SETTINGS = {"query": str, "previous_text": str, "system": str, "timestamps": bool, "fps": NUMBER,
            "chunk_duration": NUMBER, "max_pixels": int, "window_size": int, "text_round": int, "text_sink": int,
            "text_window": int, "keep_query": bool, "max_new_tokens": int, "answer_max_new_tokens": int,
            "temperature": NUMBER, "top_k": int, "top_p": NUMBER, "repetition_penalty": NUMBER, "seed": int,
            "start": NUMBER, "duration": NUMBER, "realtime": bool, "timeout": NUMBER, "reconnect": int}
SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "http", "https", "tcp", "udp", "srt", "rtp")
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
MAX_QUESTION = 500  # characters
MAX_PENDING = 8  # questions waiting for a chunk, per stream
MAX_PUSH_FPS = 10  # pushed frames per second beyond this are dropped (the page sends 2)
MAX_BAD_FRAMES = 20  # a socket that sends this many unusable frames is closed
KEEP_FINISHED = 64  # finished streams kept for their subtitles; older ones are deleted


def parse_args(argv=None) -> argparse.Namespace:
    return parser().parse_args(argv)


def parser(prog: str = "python -m runtime.serve", description: str = "A live commentary server."):
    """runtime.serve's options; runtime.cluster adds its own to them."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    cli.add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed at start)")
    p.add_argument("--token", help="every request must carry it: Authorization: Bearer TOKEN (or ?token=)")
    p.add_argument("--max-streams", type=int,
                   help="streams served at once; more are refused with 503 (default: 1 on the CPU, else from a "
                        "measured step time)")
    p.add_argument("--batch", action=argparse.BooleanOptionalAction, default=True,
                   help="run the decode steps of all decoding streams as one call (default: on; --no-batch runs "
                        "each stream's steps alone, for comparison)")
    p.add_argument("--batch-sizes", default="1,2,4,8",
                   help="the decode batch sizes the static path compiles; a batch is padded up to the next "
                        "(default 1,2,4,8)")
    p.add_argument("--allow-sources",
                   help="comma-separated source kinds clients may open: URL schemes (rtsp, http, ...), file (a "
                        "path on this machine), device (/dev/videoN), upload, push (default: all but file and "
                        "device when bound beyond localhost)")
    p.add_argument("--max-body", type=int, default=64 * 1024, help="bytes of a JSON request body (64 KiB)")
    p.add_argument("--max-upload", type=int, default=512, help="megabytes of an uploaded video (512)")
    p.add_argument("--max-frame", type=int, default=4 * 1024 * 1024, help="bytes of a pushed frame (4 MiB)")
    p.add_argument("--data-dir", help="where subtitles and uploads are kept (default: a temporary folder)")
    return p


def allowed_sources(args) -> set[str]:
    if args.allow_sources is not None:
        return {s.strip().lower() for s in args.allow_sources.split(",") if s.strip()}
    local = args.host in LOCAL_HOSTS
    return {*SCHEMES, "upload", "push", *(("file", "device") if local else ())}


def source_kind(source: str) -> str:
    """The kind --allow-sources names: a URL's scheme, file, device, pipe, upload or push."""
    if source == "push" or source.startswith("upload:"):
        return source.partition(":")[0]
    where = kind(source)
    return source.partition(":")[0].lower() if where == "network" else where


def batch_sizes(args) -> tuple[int, ...]:
    """--batch-sizes as numbers: positive, 1 among them."""
    try:
        sizes = tuple(sorted({int(size) for size in args.batch_sizes.split(",") if size.strip()}))
    except ValueError:
        sizes = ()
    if not sizes or sizes[0] != 1:
        raise cli.UsageError(f"--batch-sizes takes positive whole numbers with 1 among them, not {args.batch_sizes!r}")
    return sizes
