"""A bounded load test on loopback: several streams (files played live and a pushed camera) and several clients per
stream for a fixed time. No errors, no lost cues (every client gets every cue the stream wrote), every chunk either
commented or counted as dropped, resident memory flat, lag bounded. What it measured is printed (pytest -s) and
written to load.json in the test's folder.

Nothing here depends on the machine's speed: memory is judged from the moment the server's own state says every
stream is running with its context and cache made (each has commented WARM chunks), not from a clock time, so a
slow or busy machine that is still loading sessions when a fixed time has passed measures the same thing."""

import asyncio
import json
import statistics
import time

import aiohttp

from serve_client import Server, create, jpeg, pushed_frame, run, sse
from runtime.sample import synthetic_frame, write_clip

SECONDS = 16  # each stream's media length: the test takes about this long plus start and drain
FILES, CLIENTS = 3, 2  # file streams played live, event-stream clients per stream
WARM = 2  # chunks each stream has commented before memory is its baseline: sessions, caches and arenas exist


def resident_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


async def push_camera(session, url: str, seconds: float) -> None:
    """A client pushing 2 frames per second of a moving picture for `seconds`, then hanging up."""
    images = [jpeg(synthetic_frame(k, 128, 96, 2)) for k in range(8)]
    async with session.ws_connect(f"{url}/ws") as ws:
        began = time.monotonic()
        for k in range(int(seconds * 2) + 1):
            await asyncio.sleep(max(0.0, began + 0.5 * k - time.monotonic()))
            await ws.send_bytes(pushed_frame(0.5 * k, images[k % len(images)]))


def test_several_streams_and_clients_for_a_fixed_time(tiny_graphs, tmp_path):
    clip = write_clip(tmp_path / "clip.mp4", SECONDS, 128, 96, 10)
    # Small windows: every cache is full after 4 chunks, so memory must be flat from there on.
    settings = dict(max_new_tokens=6, seed=1, window_size=4, text_round=4, text_sink=16, text_window=16)

    async def body(server):
        memory, done = [], asyncio.Event()  # (RSS MiB, every stream warm at that moment)

        async def sample():
            while not done.is_set():
                async with session.get(f"{server.url}/v1/streams") as response:
                    streams = (await response.json())["streams"]
                warm = len(streams) == FILES + 1 and all(s["cues"] + s["answers"] >= WARM for s in streams)
                memory.append((resident_mib(server.process.pid), warm))
                await asyncio.sleep(0.5)

        async with aiohttp.ClientSession() as session:
            streams = [await create(session, server, str(clip), realtime=True, **settings) for _ in range(FILES)]
            streams.append(await create(session, server, "push", **settings))
            sampler = asyncio.create_task(sample())
            urls = [f"{server.url}/v1/streams/{s['id']}" for s in streams]
            clients = [asyncio.create_task(sse(session, f"{url}/events", limit=SECONDS + 40))
                       for url in urls for _ in range(CLIENTS)]
            await push_camera(session, urls[-1], SECONDS)
            heard = await asyncio.gather(*clients)
            files = []
            for url in urls:
                async with session.get(f"{url}/commentary.jsonl") as response:
                    files.append([json.loads(line) for line in (await response.text()).splitlines()])
                async with session.get(url) as response:
                    assert (await response.json())["state"] == "ended"
            done.set()
            await sampler
        return heard, files, memory

    with Server(tiny_graphs, "--max-streams", str(FILES + 1), data_dir=tmp_path / "data") as server:
        began = time.monotonic()
        heard, files, memory = run(body(server), limit=SECONDS + 90)
        took = time.monotonic() - began
    lags, cues = [], 0
    for k, written in enumerate(files):
        written = [line for line in written if "start" in line]
        for events in heard[k * CLIENTS:(k + 1) * CLIENTS]:
            assert not [data for kind, data in events if kind == "error"]
            assert [data for kind, data in events if kind == "cue"] == written  # none lost, none added
        starts = [c["start"] for c in written]
        assert starts == sorted(set(starts)) and len(written) >= WARM + 2
        if k < FILES:  # a file played live: every chunk is commented or counted as dropped, the last one commented
            assert [c["dropped"] for c in written] == [start - j for j, start in enumerate(starts)], written
            assert starts[-1] == SECONDS - 1, starts
        lags += [c["lag"] for c in written[1:]]  # the first includes the sessions' first run
        cues += len(written)
    # Memory from the first sample at which every stream was warm to the end: flat within 15%. At least a few
    # samples must follow (the streams went on for several chunks after warming up, however slow the machine).
    settled = [mib for mib, _ in memory[next((k for k, (_, warm) in enumerate(memory) if warm), len(memory)):]]
    assert len(settled) >= 4, memory
    growth = max(settled) / settled[0] - 1
    report = {"streams": FILES + 1, "clients_per_stream": CLIENTS, "media_seconds": SECONDS, "wall_seconds":
              round(took, 1), "cues": cues, "dropped": [f[-1].get("dropped") for f in files],
              "lag_median": round(statistics.median(lags), 3), "lag_max": round(max(lags), 3),
              "rss_mib_start": round(settled[0], 1), "rss_mib_max": round(max(settled), 1),
              "rss_growth": round(growth, 4), "rss_samples": len(settled), "rss_mib_first": round(memory[0][0], 1)}
    (tmp_path / "load.json").write_text(json.dumps(report, indent=1))
    print(f"load: {json.dumps(report)}")
    assert growth < 0.15, report
    assert max(lags) < 10, report
