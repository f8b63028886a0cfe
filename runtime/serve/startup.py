"""Starting the server: the model loaded once, how many streams it can serve, the app bound and run until
SIGINT or SIGTERM, and the one-line errors of `python -m runtime.serve`."""

import asyncio
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from aiohttp import web

from .. import stream as cli
from ..commentator import Commentator
from ..live import redact
from ..manifest import Manifest, ManifestError
from ..providers import PROVIDERS, ProviderError
from ..video import VideoError
from .app import Server
from .local import Local
from .options import LOCAL_HOSTS, batch_sizes, parse_args


def measured_max_streams(model, manifest: Manifest, args) -> int:
    """How many streams of 1 s chunks a GPU keeps up with, with a fifth of headroom: B streams at 640x360 (B = the
    largest --batch-sizes; 1 with --no-batch) comment one chunk together, decode steps batched, in T seconds (the
    second of three chunks, the first compiles); then N = floor(0.8 x B / T). Prefills scale with N and batched
    decode steps cost little more per extra row, so past B streams the cost per chunk grows about linearly. The
    CPU serves one: its step already uses every core (give --max-streams to serve more)."""
    import numpy as np

    from ..batch import Batch, together
    from ..video import Chunk

    if model.providers[0] == PROVIDERS["cpu"]:
        return 1
    defaults = cli.parse_args(["push"])
    defaults.static = args.static
    width = batch_sizes(args)[-1] if args.batch else 1
    batch = Batch(model, bool(args.static), batch_sizes(args), width)
    commentators = [Commentator(model, cli.config_from(defaults), batch) for _ in range(width)]
    height, width_px = cli.chunking(defaults, manifest)["resize"](360, 640)
    times = []
    for index in range(3):
        frames = np.zeros((2, height, width_px, 3), np.uint8)
        began = time.perf_counter()
        together(batch, [c.turn(Chunk(index, index, index + 1, frames)) for c in commentators])
        times.append(time.perf_counter() - began)
    for commentator in commentators:
        commentator.close()
    return max(1, int(0.8 * width / times[1]))


def check_limits(args) -> None:
    if args.max_streams is not None and args.max_streams < 1 or min(args.max_body, args.max_upload,
                                                                     args.max_frame) < 1:
        raise cli.UsageError("--max-streams, --max-body, --max-upload and --max-frame must be >= 1")
    batch_sizes(args)
    if not args.token and args.host not in LOCAL_HOSTS:
        print(f"warning: {args.host} without --token: anyone who reaches this port can make the server open URLs "
              "and use its model", file=sys.stderr, flush=True)


async def serve(args) -> None:
    from ..model import Model

    check_limits(args)
    manifest = Manifest.load(cli.find_graphs(args.graphs))
    providers, options = cli.session_setup(args)
    model = Model(manifest, providers, args.threads, options)
    max_streams = args.max_streams or measured_max_streams(model, manifest, args)
    await run_app(args, manifest, Local(args, manifest, model, max_streams), max_streams,
                  f"{providers[0]}, at most {max_streams} stream(s)")


async def run_app(args, manifest: Manifest, backend, max_streams: int, what: str) -> None:
    """Serve the API over `backend` (local.py's `Local`, or runtime.cluster's `Cluster`) until SIGINT or SIGTERM."""
    temporary = args.data_dir is None
    data_dir = Path(tempfile.mkdtemp(prefix="qwen3vl-serve-") if temporary else args.data_dir)
    server = Server(args, manifest, backend, max_streams, data_dir)
    runner = web.AppRunner(server.app(), shutdown_timeout=2)
    await runner.setup()
    try:
        site = web.TCPSite(runner, args.host, args.port)
        await site.start()
        host, port = runner.addresses[0][:2]
        print(f"serving http://{host if ':' not in host else f'[{host}]'}:{port}/ (graphs {manifest.root}, "
              f"{what}; sources: {', '.join(sorted(server.allowed))})", file=sys.stderr, flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
    finally:
        server.closing = True
        await runner.cleanup()
        server.backend.close()
        if temporary:
            shutil.rmtree(data_dir, ignore_errors=True)


def main(argv=None, parse=parse_args, run=serve) -> int:
    """runtime.serve's command (runtime.cluster's with its own `parse` and `run`): one-line errors, exit status."""
    args = parse(argv)
    try:
        asyncio.run(run(args))
    except (ManifestError, ProviderError, cli.UsageError, VideoError) as error:
        print(f"error: {redact(str(error))}", file=sys.stderr)
        return 1
    except OSError as error:  # e.g. the port is taken
        print(f"error: {error.strerror or error}", file=sys.stderr)
        return 1
    print("stopped", file=sys.stderr)
    return 0

