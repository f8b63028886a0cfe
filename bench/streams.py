"""The "streams" section of make bench: what batching buys, measured through the engine and through the server.

    python -m bench.streams [--quick] [--results bench/results] [--only rows|server]

1. Decode step at B = 1, 2, 4, 8 rows, 1k and 4k cached tokens per row, real widths (4 layers), fp32 and int4:
   `runtime.batch.Batch.decode` over B streams' engines sharing one cache (host overhead included), B taken in
   alternation round after round so that the machine's drift hits every B alike; ratios to B = 1 per round,
   reported as the median with its range. Beside it, whether a prefill of B rows costs less than B prefills (the
   prefill graph called directly, micro and the int4 real widths).
2. The server with N concurrent live streams (`python -m runtime.serve`, files played with "realtime"), batched and
   --no-batch alternately in the same run: per-stream lag median / p90 (first cue left out), dropped chunks, and the
   media seconds commented per wall second over all streams. Micro on a clip of its world; the real widths in int4 at
   320x180.

Writes streams.json and streams.png under --results.
"""

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from runtime.batch import Batch
from runtime.commentator import Decode
from runtime.engine import HostEngine, StaticEngine
from runtime.rope import Rope

from .measure import step_feeds

ROWS = (1, 2, 4, 8)
CACHED = (1024, 4096)
ROUNDS = 5
MICRO_STREAMS = (1, 8, 16, 32, 48, 64)
WIDE_STREAMS = (1, 2, 4)
SECONDS = 20  # media per server run


def decode_rows(model, rows=ROWS, cached=CACHED, rounds=ROUNDS, static: bool = False) -> dict:
    """ms per batched decode step by (cached, B): every round measures every B once, in turn. `static`: engines
    on the device path (one block of rows; the GPU check)."""
    text = model.manifest["text"]
    rope = Rope(text["inv_freq"], text["mrope_section"])
    out = {}
    for n in cached:
        batch = Batch(model, static=static, buckets=rows, streams=max(rows))
        if static:
            engines = [StaticEngine(model, n + 64, 2, batch.device_rows(n + 64)) for _ in range(max(rows))]
        else:
            engines = [HostEngine(model, n + 64, rope, batch.host_rows(n + 64)) for _ in range(max(rows))]
        for engine in engines:  # n cached tokens whose K/V exist (their values do not change the cost)
            slots = engine.pool.allocate(n)
            engine.pool.written[slots] = True
        embeds = np.zeros((1, model.hidden), np.float32)
        times = {b: [] for b in rows}

        def step(b):
            steps = []
            for engine in engines[:b]:
                slot = engine.pool.allocate(1)
                steps.append(Decode(engine, embeds, np.full((3, 1), n, np.int64), slot))
            began = time.perf_counter()
            batch.decode(steps)
            elapsed = time.perf_counter() - began
            for decode in steps:  # the next step reuses the slot: the cache stays at n tokens
                decode.engine.pool.free(decode.slots)
            return elapsed

        for b in rows:
            step(b)  # warm-up: the session for this many rows
        for _ in range(rounds):
            for b in rows:
                times[b].append(step(b) * 1000)
        ratios = {b: [t / t1 for t, t1 in zip(times[b], times[1])] for b in rows}
        out[n] = {b: {"ms": statistics.median(times[b]), "ratio": statistics.median(ratios[b]),
                      "ratio_range": [min(ratios[b]), max(ratios[b])],
                      "tokens_per_s": b * 1000 / statistics.median(times[b])} for b in rows}
        for engine in engines:
            engine.close()
    return out


def prefill_rows(model, rows=(1, 2, 4), new: int = 128, cached: int = 1024, rounds: int = ROUNDS) -> dict:
    """Is a batched prefill cheaper than B prefills? The prefill graph called directly with B rows of `new` tokens
    onto `cached` past tokens each (what the graph allows; the scheduler runs prefills alone): ms per call and the
    median ratio to B = 1, B in alternation."""
    session = model.session("prefill")
    inputs = {b: step_feeds(model, cached, new, b) for b in rows}
    times = {b: [] for b in rows}
    for b in rows:
        session.run(None, inputs[b])  # warm-up
    for _ in range(rounds):
        for b in rows:
            began = time.perf_counter()
            session.run(None, inputs[b])
            times[b].append((time.perf_counter() - began) * 1000)
    return {b: {"ms": statistics.median(times[b]),
                "ratio": statistics.median([t / t1 for t, t1 in zip(times[b], times[1])])} for b in rows}


def serve_run(graphs: Path, clip: Path, streams: int, batched: bool, threads: int, seconds: float,
              module: str = "runtime.serve", flags: tuple = ()) -> dict:
    """N live streams of `clip` on one server (`module`: runtime.serve, or runtime.cluster with its `flags`); what
    each stream's cues say, how long the server took to start and its resident memory (its whole process tree)."""
    import aiohttp

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(Path.cwd()), os.environ.get("PYTHONPATH")])))
    flags = ["--graphs", str(graphs), "--port", "0", "--max-streams", str(streams), "--threads", str(threads),
             "--batch" if batched else "--no-batch", *flags]
    began = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", module, *flags], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while not line.startswith("serving "):
            line = process.stderr.readline()
            if not line:
                raise RuntimeError("the server did not start")
        started = time.perf_counter() - began
        threading.Thread(target=lambda: process.stderr.read(), daemon=True).start()  # keep its pipe drained
        url = line.split()[1].rstrip("/")
        idle_mib = tree_rss_mib(process.pid)

        async def body():
            async with aiohttp.ClientSession() as session:
                ids = []
                for _ in range(streams):
                    async with session.post(f"{url}/v1/streams", json={"source": str(clip), "realtime": True,
                                                                       "seed": 1}) as response:
                        ids.append((await response.json())["id"])
                began, peak = time.monotonic(), 0.0
                while time.monotonic() - began < seconds + 120:
                    async with session.get(f"{url}/v1/streams") as response:
                        listing = await response.json()
                    peak = max(peak, tree_rss_mib(process.pid))
                    if all(s["state"] != "running" and s["state"] != "starting" for s in listing["streams"]):
                        break
                    await asyncio.sleep(0.5)
                cues = []
                for id in ids:
                    async with session.get(f"{url}/v1/streams/{id}/commentary.jsonl") as response:
                        cues.append([json.loads(x) for x in (await response.text()).splitlines() if '"start"' in x])
                return cues, listing.get("batch"), peak

        cues, batch, peak_mib = asyncio.run(body())
    finally:
        process.terminate()
        process.wait(timeout=60)
    lags = [c["lag"] for stream in cues for c in stream[1:]]
    commented = sum(len(stream) for stream in cues)
    return {"streams": streams, "batched": batched, "lag_median": statistics.median(lags) if lags else None,
            "lag_p90": float(np.percentile(lags, 90)) if lags else None,
            "dropped": [stream[-1]["dropped"] if stream else None for stream in cues],
            "media_per_wall_second": commented / seconds, "chunks": seconds,
            "mean_batch": batch["rows_decoded"] / batch["decode_calls"] if batch and batch["decode_calls"] else None,
            "start_s": started, "idle_mib": idle_mib, "peak_mib": peak_mib}


def tree_rss_mib(pid: int) -> float:
    """Resident memory of a process and all its descendants (a cluster's are Ray's daemons and replicas), MiB."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            total += int(open(f"/proc/{current}/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            for task in os.listdir(f"/proc/{current}/task"):
                todo += [int(c) for c in open(f"/proc/{current}/task/{task}/children").read().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total / 2**20


def serve_sweep(graphs: Path, clip: Path, counts, threads: int, seconds: float) -> list[dict]:
    """Batched and unbatched alternately at each N (the machine's drift hits both)."""
    rows = []
    for n in counts:
        for batched in (True, False):
            row = serve_run(graphs, clip, n, batched, threads, seconds)
            print(f"  N={n} {'batched' if batched else 'no-batch'}: lag median {row['lag_median']}, p90 "
                  f"{row['lag_p90']}, dropped {sum(d or 0 for d in row['dropped'])}, media/s "
                  f"{row['media_per_wall_second']:.2f}, mean batch {row['mean_batch']}", flush=True)
            rows.append(row)
    return rows


def real_time(rows: list[dict], batched: bool, chunk: float = 1.0) -> int:
    """The largest N served at real time: no chunk dropped, lag p90 under one chunk."""
    ok = [r["streams"] for r in rows if r["batched"] == batched and not any(r["dropped"]) and r["lag_p90"] is not None
          and r["lag_p90"] < chunk]
    return max(ok, default=0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.streams")
    p.add_argument("--quick", action="store_true", help="tiny sizes, seconds: checks the plumbing only")
    p.add_argument("--results", default="bench/results")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--only", choices=("rows", "server"))
    args = p.parse_args(argv)
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    print(json.dumps(run(args.quick, args.threads or os.cpu_count(), out, args.only), indent=1))
    return 0


def run(quick: bool, threads: int, out: Path, only: str | None = None) -> dict:
    from export.pipeline import ExportOptions
    from export.pipeline import run as export
    from runtime.sample import write_clip, write_world_clip

    from .models import BenchModel, build_exports

    root = Path("build/bench")
    exports = build_exports(root, quick=quick)
    micro = export(ExportOptions("micro", root / "micro", verify=False), log=lambda *_: None)
    setup = {"cores": os.cpu_count(), "threads": threads, "provider": "CPUExecutionProvider"}
    results = {"setup": setup}
    previous = out / "streams.json"
    if only and previous.is_file():  # a partial run keeps the other part's numbers
        results = {**json.loads(previous.read_text()), "setup": setup}
    if only in (None, "rows"):
        print("batched decode steps", flush=True)
        cached = (64, 256) if quick else CACHED
        rounds = 2 if quick else ROUNDS
        results["rows"] = {name: {"model": exports[key].describe(), "steps": decode_rows(
            exports[key].model(threads), cached=cached, rounds=rounds)} for name, key in (("fp32", "wide"),
                                                                                          ("int4", "wide_int4"))}
        print("batched prefills (graph called directly)", flush=True)
        new = 32 if quick else 128
        results["prefill_rows"] = {
            f"micro, 40 new onto {cached[0]}": prefill_rows(BenchModel(micro, "micro").model(threads), new=40,
                                                            cached=cached[0], rounds=rounds),
            f"int4 real widths, {new} new onto {cached[0]}": prefill_rows(exports["wide_int4"].model(threads),
                                                                          new=new, cached=cached[0], rounds=rounds)}
    if only in (None, "server"):
        seconds = 4 if quick else SECONDS
        clip, _ = write_world_clip(root / f"world-{seconds}s.mp4", seconds, seed=5)
        print("server, micro", flush=True)
        results["server_micro"] = serve_sweep(micro, clip, (1, 2) if quick else MICRO_STREAMS, threads, seconds)
        print("server, real widths int4 at 320x180", flush=True)
        wide_clip = write_clip(root / f"clip-{seconds}s-320x180.mp4", seconds, 320, 180, fps=10)
        results["server_wide_int4"] = serve_sweep(exports["wide_int4"].graphs, wide_clip,
                                                  (1, 2) if quick else WIDE_STREAMS, threads, seconds)
        results["real_time_streams"] = {"batched": real_time(results["server_micro"], True),
                                        "no_batch": real_time(results["server_micro"], False)}
    previous.write_text(json.dumps(results, indent=1) + "\n")
    plot(out, results)
    return results


def plot(out: Path, results: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for dtype, table in results.get("rows", {}).items():
        for n, steps in table["steps"].items():
            rows = sorted(int(b) for b in steps)
            left.plot(rows, [steps[b if b in steps else str(b)]["ratio"] for b in rows], "o-",
                      label=f"{dtype}, {n} cached/row")
    left.plot(ROWS, ROWS, ":", color="grey", label="B separate steps")
    left.set_xlabel("rows (streams) per decode step")
    left.set_ylabel("step time / B=1 step")
    left.set_title("batched decode step, real widths, 4 layers", fontsize=9)
    left.legend(fontsize=7)
    for batched, style in ((True, "o-"), (False, "s--")):
        rows = [r for r in results.get("server_micro", []) if r["batched"] == batched]
        right.plot([r["streams"] for r in rows], [r["media_per_wall_second"] for r in rows], style,
                   label=f"micro, {'batched' if batched else '--no-batch'}")
    right.set_xlabel("concurrent live streams")
    right.set_ylabel("media seconds commented per second")
    right.set_title("server throughput (1 s chunks)", fontsize=9)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "streams.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
