"""python -m runtime.cluster on a local Ray cluster (started and stopped by the server under test: 2 CPUs, no
dashboard, a small object store) with two replicas of the micro model: streams spread over both, events, questions
and downloads reach the right replica, and one replica killed: its streams end with an error event (their sockets
close) and then 410, the other replica's streams go on, Ray's replacement takes a new stream, and a lost URL stream
resumes with its subtitles going on. Every wait is bounded. Skipped without Ray (pip install -e '.[cluster]'),
unless REQUIRE_RAY=1 (CI)."""

import asyncio
import json
import os
import signal
import time
from collections import Counter

import aiohttp
import pytest

from conftest import cli
from live_servers import TsServer, ts_clip
from serve_client import CLUSTER, Server, create, run, sse
from runtime.sample import write_world_clip



def needs_ray() -> None:
    if os.environ.get("REQUIRE_RAY"):
        import ray  # noqa: F401  (CI: a missing Ray fails here instead of skipping)
    else:
        pytest.importorskip("ray", reason="the cluster needs pip install -e '.[cluster]'")

SECONDS = 45  # media per file stream, played in real time


def cues(events) -> int:
    return sum(kind == "cue" for kind, _ in events)


async def listing(session, server) -> dict:
    async with session.get(f"{server.url}/v1/streams") as response:
        assert response.status == 200
        return await response.json()


async def status(session, method: str, url: str, **kwargs) -> int:
    async with session.request(method, url, **kwargs) as response:
        return response.status


def test_bad_starts_are_one_line_errors(tiny_graphs, tmp_path):
    """No Ray, no graphs, no replicas: one line and exit status 1, never a traceback (and no Ray started)."""
    no_ray = "import sys; sys.modules['ray'] = None; from runtime.cluster.main import main; sys.exit(main(sys.argv[1:]))"
    for args, said in ((["--graphs", str(tiny_graphs)], "runtime.cluster needs Ray: pip install -e '.[cluster]'"),
                       (["--graphs", str(tmp_path / "nothing")], "nothing"),
                       (["--graphs", str(tiny_graphs), "--replicas", "0"], "--replicas must be >= 1")):
        run = cli("-c", no_ray, *args, "--port", "0")
        assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
        assert run.stderr.startswith("error: ") and said in run.stderr and len(run.stderr.splitlines()) == 1


def test_a_replica_that_cannot_start_says_why_in_one_line(tiny_graphs):
    needs_ray()
    run = cli("-m", "runtime.cluster", "--graphs", str(tiny_graphs), *CLUSTER, "--provider", "migraphx", "--port", "0")
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert len(errors) == 1 and "did not start" in errors[0] and "migraphx" in errors[0], run.stderr


def test_streams_spread_over_replicas_and_outlive_a_lost_one(micro_graphs, tmp_path):
    needs_ray()
    clip, _ = write_world_clip(tmp_path / "world.mp4", SECONDS, seed=4)
    feed = TsServer(ts_clip(tmp_path / "feed.ts", SECONDS), SECONDS, ["full", "full"], limit=240)
    with Server(micro_graphs, *CLUSTER, "--max-streams", "2", data_dir=tmp_path / "data", module="runtime.cluster",
                timeout=180) as server:
        async def body():
            async with aiohttp.ClientSession() as session:
                # Four streams, two per replica: the most room wins, ties go to the first replica.
                live = await create(session, server, feed.url())
                files = [await create(session, server, str(clip), realtime=True) for _ in range(3)]
                streams = [live, *files]
                where = {s["id"]: s["replica"] for s in streams}
                assert sorted(Counter(where.values()).values()) == [2, 2], where
                doomed = where[live["id"]]
                lost = [s["id"] for s in streams if where[s["id"]] == doomed]
                kept = [s["id"] for s in streams if where[s["id"]] != doomed]
                url = f"{server.url}/v1/streams"
                await asyncio.sleep(0)

                # Cues over SSE from all four.
                firsts = await asyncio.gather(*(sse(session, f"{url}/{id}/events", lambda e: cues(e) >= 2, limit=60)
                                                for id in where))
                assert all(cues(events) >= 2 for events in firsts), firsts

                # A question reaches its stream's replica: the answer comes on that stream's events and subtitles.
                asked = kept[0]
                async with session.post(f"{url}/{asked}/questions", json={"text": "what is there?"}) as response:
                    assert response.status == 202, await response.text()
                answered = await sse(session, f"{url}/{asked}/events",
                                     lambda e: any(kind == "answer" for kind, _ in e), limit=60)
                answer = next(data for kind, data in answered if kind == "answer")
                assert answer["question"] == "what is there?"
                for id in where:
                    async with session.get(f"{url}/{id}/commentary.jsonl") as response:
                        assert response.status == 200
                        lines = [json.loads(x) for x in (await response.text()).splitlines() if '"start"' in x]
                    assert any(c.get("question") == "what is there?" for c in lines) == (id == asked)

                # Kill the replica of the live stream.
                before = await listing(session, server)
                replica = next(r for r in before["replicas"] if r["name"] == doomed)
                at_kill = {s["id"]: s["media_time"] for s in before["streams"]}
                socket = await session.ws_connect(f"{url}/{lost[1]}/ws")
                killed = time.monotonic()
                os.kill(replica["pid"], signal.SIGKILL)
                ended = await asyncio.gather(*(sse(session, f"{url}/{id}/events",
                                                   lambda e: any(kind == "error" for kind, _ in e), limit=60)
                                               for id in lost))
                errors_at = time.monotonic()
                for events in ended:
                    kinds = [kind for kind, _ in events]
                    assert "error" in kinds, kinds
                    error = next(data for kind, data in events if kind == "error")["error"]
                    assert error["type"] == "replica_lost" and doomed in error["message"]
                while (message := await asyncio.wait_for(socket.receive(), 30)).type == aiohttp.WSMsgType.TEXT:
                    pass  # its events, the error last; then the server closes the socket
                assert message.type == aiohttp.WSMsgType.CLOSE and message.data == 1011, message
                await socket.close()
                for id in lost:
                    assert await status(session, "GET", f"{url}/{id}") == 410
                    assert await status(session, "POST", f"{url}/{id}/questions", json={"text": "hello?"}) == 410
                    assert await status(session, "POST", f"{url}/{id}/stop") == 410
                    assert await status(session, "GET", f"{url}/{id}/commentary.vtt") == 200  # its subtitles stay
                assert await status(session, "POST", f"{url}/{kept[0]}/resume") == 409  # alive: nothing to resume

                # Ray replaces the replica; the other replica's streams go on before and after.
                while True:
                    now = await listing(session, server)
                    back = next(r for r in now["replicas"] if r["name"] == doomed)
                    if back["alive"] and back["lost"] == 1:
                        break
                    assert time.monotonic() - killed < 90, "the replica was not replaced"
                    await asyncio.sleep(0.25)
                ready_at = time.monotonic()
                assert back["pid"] != replica["pid"]
                fresh = await create(session, server, str(clip), realtime=True, duration=6)
                assert fresh["replica"] == doomed  # the replacement has all the room
                await sse(session, f"{url}/{fresh['id']}/events", lambda e: cues(e) >= 2, limit=60)
                after = {s["id"]: s for s in (await listing(session, server))["streams"]}
                for id in kept:  # no gap: every chunk commented or counted as dropped (however slow the machine),
                    assert after[id]["state"] == "running" and after[id]["error"] is None  # two or more past the kill
                    async with session.get(f"{url}/{id}/commentary.jsonl") as response:
                        lines = [json.loads(x) for x in (await response.text()).splitlines() if '"start"' in x]
                    assert len({round(c["start"] - k - c["dropped"], 6) for k, c in enumerate(lines)}) == 1, lines
                    assert lines[-1]["end"] >= at_kill[id] + 2, (at_kill[id], lines[-1])

                # The lost live (URL) stream resumes on a replica; its subtitles go on where they stopped.
                async with session.get(f"{url}/{live['id']}/commentary.jsonl") as response:
                    old = [json.loads(x) for x in (await response.text()).splitlines() if '"start"' in x]
                async with session.post(f"{url}/{live['id']}/resume") as response:
                    assert response.status == 200, await response.text()
                    resumed_on = (await response.json())["replica"]
                had = cues(ended[0])  # the live stream's cues before it was lost (its events replay from the first)
                resumed = await sse(session, f"{url}/{live['id']}/events", lambda e: cues(e) >= had + 2, limit=60)
                assert cues(resumed) >= had + 2 and ("status", {"status": "resumed", "replica": resumed_on}) in resumed
                async with session.get(f"{url}/{live['id']}/commentary.jsonl") as response:
                    new = [json.loads(x) for x in (await response.text()).splitlines() if '"start"' in x]
                assert new[:len(old)] == old and len(new) > len(old)
                assert all(a["end"] <= b["start"] for a, b in zip(new, new[1:]))
                print(f"timeline: kill -> error events {errors_at - killed:.2f} s, kill -> replacement ready "
                      f"{ready_at - killed:.2f} s; resumed live stream went on from {old[-1]['end']} s")

        run(body(), limit=400)
