"""The commentary server end to end with the tiny model, on loopback: file and live sources, server-sent events and
the socket, questions mid-stream (also the CLI's --questions), subtitles, the token, --max-streams, limits on
bodies and frames, and misbehaving clients that do not disturb the other streams. Every wait is bounded."""

import asyncio
import json

import aiohttp
import numpy as np
import pytest

from live_servers import TsServer, ts_clip
from serve_client import Server, create, jpeg, pushed_frame, run, sse
from runtime import stream
from runtime.commentator import Commentator, StreamConfig
from runtime.context import Settings
from runtime.manifest import Manifest
from runtime.model import Model
from runtime.preprocess import smart_resize
from runtime.sample import synthetic_frame, write_clip
from runtime.sampling import Sampling
from runtime.subtitles import parse_srt, parse_vtt
from runtime.video import read_chunks

TOKEN = "s3cret"
QUICK = dict(max_new_tokens=4, answer_max_new_tokens=6, seed=1)


def test_a_file_stream_end_to_end_behind_the_token(tiny_graphs, tmp_path):
    clip = write_clip(tmp_path / "clip.mp4", 4, 128, 96, 10)
    cli_out = tmp_path / "cli.jsonl"
    assert stream.main([str(clip), "--graphs", str(tiny_graphs), "--out", str(cli_out), "--quiet",
                        "--max-new-tokens", "4", "--seed", "1"]) == 0

    async def body(server):
        async with aiohttp.ClientSession() as anonymous:
            for method, path in [("GET", "/v1/streams"), ("POST", "/v1/streams"), ("GET", "/v1/streams/x/events"),
                                 ("GET", "/v1/streams?token=wrong")]:
                async with anonymous.request(method, server.url + path) as response:
                    assert response.status == 401 and "token" in (await response.json())["error"]
            async with anonymous.get(server.url + "/") as response:  # the page asks for the token itself
                assert response.status == 200 and "<video" in await response.text()
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as session:
            created = await create(session, server, str(clip), max_new_tokens=4, seed=1)
            base = f"{server.url}/v1/streams/{created['id']}"
            events = await sse(session, f"{base}/events")
            async with aiohttp.ClientSession() as anonymous:  # a browser's EventSource: the token in the query
                again = await sse(anonymous, f"{base}/events?token={TOKEN}")
            assert again == events
            downloads = {}
            for fmt in ("vtt", "srt", "jsonl"):
                async with session.get(f"{base}/commentary.{fmt}") as response:
                    assert response.status == 200
                    downloads[fmt] = await response.text()
            async with session.get(base) as response:
                info = await response.json()
            async with session.delete(base) as response:
                assert response.status == 200
            async with session.get(f"{base}/commentary.vtt") as response:
                assert response.status == 404
            async with session.post(f"{server.url}/v1/uploads", data=clip.read_bytes()) as response:
                upload = await response.json()  # what the page does with a file it plays beside the cues
            async with session.post(f"{server.url}/v1/uploads", data=b"\0" * (1 << 20) + b"\0") as response:
                assert response.status == 413 and "--max-upload" in (await response.json())["error"]
            uploaded = await create(session, server, upload["source"], max_new_tokens=4, seed=1)
            from_upload = await sse(session, f"{server.url}/v1/streams/{uploaded['id']}/events")
        return events, downloads, info, from_upload

    with Server(tiny_graphs, "--token", TOKEN, "--max-upload", "1", data_dir=tmp_path / "data") as server:
        events, downloads, info, from_upload = run(body(server))
    assert from_upload == events
    expected = [json.loads(line) for line in cli_out.read_text().splitlines()]
    assert [data for kind, data in events if kind == "status"] == [{"state": "running"}, {"state": "ended"}]
    assert [data for kind, data in events if kind == "cue"] == expected  # a JSON line of the CLI per cue
    assert downloads["jsonl"] == cli_out.read_text()  # a file stream's subtitles are the CLI's, byte for byte
    shown = [(c["start"], c["end"], c["text"]) for c in expected if c["text"]]
    assert parse_vtt(downloads["vtt"]) == shown and parse_srt(downloads["srt"]) == shown
    assert info["state"] == "ended" and info["cues"] == 4 and info["cache_tokens"] > 0
    assert {"vision", "prefill", "decode"} <= set(info["seconds"]) and info["real_time_factor"] > 0
    assert len(list((tmp_path / "data").glob("*/commentary.vtt"))) == 1  # the first went with its stream


def test_a_live_source_answers_questions_over_http_and_the_socket(tiny_graphs, tmp_path):
    feed = TsServer(ts_clip(tmp_path / "feed.ts", 8), 8, ["full"], limit=60)

    async def body(server):
        async with aiohttp.ClientSession() as session:
            created = await create(session, server, feed.url("user:pw@"), reconnect=0, **QUICK)
            base = f"{server.url}/v1/streams/{created['id']}"
            listening = asyncio.create_task(sse(session, f"{base}/events"))
            seen, asked = [], False
            async with session.ws_connect(f"{base}/ws", timeout=aiohttp.ClientWSTimeout(ws_close=5)) as ws:
                while not seen or seen[-1].get("state") != "ended":
                    message = await asyncio.wait_for(ws.receive_json(), 30)
                    seen.append(message)
                    if message["type"] == "cue" and not asked:
                        asked = True
                        async with session.post(f"{base}/questions", json={"text": "what just happened?"}) as r:
                            assert r.status == 202
                        await ws.send_json({"type": "conversation.item.create", "item": {
                            "type": "message", "role": "user",
                            "content": [{"type": "input_text", "text": "who scored?"}]}})
                        await ws.send_json({"type": "question", "text": ""})  # refused with an error event
            events = await asyncio.wait_for(listening, 30)
            async with session.get(f"{base}/commentary.jsonl") as response:
                lines = [json.loads(line) for line in (await response.text()).splitlines()]
            async with session.get(f"{base}/commentary.vtt") as response:
                vtt = await response.text()
        return seen, events, lines, vtt

    with Server(tiny_graphs, data_dir=tmp_path / "data") as server:
        seen, events, lines, vtt = run(body(server))
    feed.join()
    answers = [m for m in seen if m["type"] == "answer"]
    assert [a["question"] for a in answers] == ["what just happened?", "who scored?"]  # one per chunk, in order
    assert all(a["asked"] <= a["start"] and a["text"] is not None and "lag" in a for a in answers)
    assert [e for e in seen if e["type"] == "error"][0]["error"]["code"] == "invalid_question"
    cues = [m for m in seen if m["type"] in ("cue", "answer")]
    assert len(cues) >= 3 and all("lag" in c and "dropped" in c for c in cues)
    # every chunk of the feed commented (an answer is a chunk's reply too) or counted as dropped: none lost, however
    # slow the machine
    assert len({round(c["start"] - k - c["dropped"], 6) for k, c in enumerate(cues)}) == 1, cues
    assert [(kind, data) for kind, data in events if kind in ("cue", "answer")] == \
        [(c["type"], {k: v for k, v in c.items() if k not in ("type", "event_id")}) for c in cues]
    statuses = [data for kind, data in events if kind == "status"]
    assert statuses[0]["status"] == "connected" and statuses[0]["source"].startswith("tcp://***@")
    assert [line["question"] for line in lines if "question" in line] == ["what just happened?", "who scored?"]
    assert "Q: what just happened?" in vtt and parse_vtt(vtt)


def test_limits_and_misbehaving_clients_leave_the_other_stream_alone(tiny_graphs, tmp_path):
    clip = write_clip(tmp_path / "clip.mp4", 6, 128, 96, 10)
    image = jpeg(synthetic_frame(0, 128, 96, 10))

    async def body(server):
        async with aiohttp.ClientSession() as session:
            other = await create(session, server, str(clip), realtime=True, **QUICK)
            pushed = await create(session, server, "push", **QUICK)
            async with session.post(f"{server.url}/v1/streams", json={"source": str(clip)}) as response:
                assert response.status == 503 and "--max-streams" in (await response.json())["error"]
            for bad, status in [({"source": str(clip), "query": "x" * 4000}, 413), ({"source": "pipe:0"}, 403),
                                ({"source": str(clip), "fps": "fast"}, 400), ({"source": "/no/such.mp4"}, 400),
                                ({"source": "-h"}, 400),  # a source, not an option: the server must not exit
                                ({"source": str(clip), "fps": float("nan")}, 400),
                                ({"source": str(clip), "fps": 1e6}, 400),
                                ({"source": str(clip), "max_new_tokens": 10**6}, 400)]:
                async with session.post(f"{server.url}/v1/streams", json=bad) as response:
                    assert response.status == status, await response.text()
            # a page of another origin cannot drive the server (no CSRF through the user's browser)
            async with session.get(f"{server.url}/v1/streams", headers={"Origin": "http://elsewhere.example"}) as r:
                assert r.status == 403 and "origin" in (await r.json())["error"]
            listening = asyncio.create_task(sse(session, f"{server.url}/v1/streams/{other['id']}/events"))
            replies = []
            async with session.ws_connect(f"{server.url}/v1/streams/{pushed['id']}/ws") as ws:
                for k in range(8):  # four chunks of frames at 2 fps of capture time, sent at about 6 per second
                    await ws.send_bytes(pushed_frame(100 + 0.5 * k, image))
                    await asyncio.sleep(0.15)
                await ws.send_bytes(b"\x00" * 20)  # garbage
                await ws.send_bytes(pushed_frame(200.0, b"\xff\xd8 not a jpeg"))
                while sum(m["type"] == "error" for m in replies) < 2 or not any(m["type"] == "cue" for m in replies):
                    replies.append(await asyncio.wait_for(ws.receive_json(), 20))
                await ws.send_bytes(b"\xff" * 200_000)  # over --max-frame: the socket is closed
                closing = await asyncio.wait_for(ws.receive(), 10)
                assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)
            assert ws.close_code == 1009
            for _ in range(100):  # the client that fed it is gone: the stream ends and frees its place
                async with session.get(f"{server.url}/v1/streams/{pushed['id']}") as response:
                    if (await response.json())["state"] != "running":
                        break
                await asyncio.sleep(0.1)
            async with session.get(f"{server.url}/v1/streams/{pushed['id']}") as response:
                assert (await response.json())["state"] == "ended"
            third = await create(session, server, str(clip), **QUICK)  # a place is free again
            events = await asyncio.wait_for(listening, 40)
            async with session.delete(f"{server.url}/v1/streams/{third['id']}") as response:
                assert response.status == 200
        return replies, events

    with Server(tiny_graphs, "--max-streams", "2", "--max-body", "2048", "--max-frame", "100000",
                data_dir=tmp_path / "data") as server:
        replies, events = run(body(server))
    errors = [m["error"]["code"] for m in replies if m["type"] == "error"]
    assert errors == ["invalid_frame", "invalid_frame"]
    pushed = [m["start"] for m in replies if m["type"] == "cue"]
    assert pushed and set(pushed) <= {0, 1, 2} and pushed == sorted(pushed)  # pushed frames make cues
    # The other stream went on: every chunk commented or counted as dropped (a busy worker may skip one), none lost
    cues = [data for kind, data in events if kind == "cue"]
    assert [c["start"] - k for k, c in enumerate(cues)] == [c["dropped"] for c in cues] and cues[-1]["start"] == 5
    skipped = [data for kind, data in events if kind == "dropped"]  # each skip said when it happened
    assert sum(d["chunks"] for d in skipped) == cues[-1]["dropped"]
    assert all(d["before"] in [c["start"] for c in cues] for d in skipped)
    # how many were commented depends on the machine's speed; that the last one was, and every skip was counted,
    # does not
    assert len(cues) >= 2 and events[-1] == ("status", {"state": "ended"}) and "error" not in dict(events)


def small_chunks(graphs, folder):
    """The manifest and the 8 chunks of a small clip, at the sizes the graphs' preprocessing picks."""
    manifest = Manifest.load(graphs)
    prep = manifest["preprocess"]
    factor = prep["patch_size"] * prep["merge_size"]
    clip = write_clip(folder / "clip.mp4", 8, 64, 64, 4)
    return manifest, list(read_chunks(clip, resize=lambda h, w: smart_resize(h, w, factor, prep["min_pixels"],
                                                                             prep["max_pixels"])))


@pytest.mark.parametrize("window_size, text_round, gone_at", [(4, 2, 4), (2, 4, 6)])
def test_a_question_is_text_of_its_turn_and_leaves_with_it(tiny_graphs, tmp_path, window_size, text_round, gone_at):
    """A question joins its chunk's user turn after the vision block; it lives as long as the turn's text: it goes
    with the Time= text when the reply (its answer) is folded (vision window longer than the text rounds), else with
    the whole turn."""
    manifest, chunks = small_chunks(tiny_graphs, tmp_path)
    config = StreamConfig(Settings(window_size, text_round, 8, 8), Sampling(temperature=0), max_new_tokens=2,
                          question_tokens=4, answer_max_new_tokens=3)
    commentator = Commentator(Model(manifest), config)
    question = commentator.prompter.encode("who scored the goal just now?")
    present = []
    for chunk in chunks:
        reply = commentator.step(chunk, "who scored the goal just now?" if chunk.index == 2 else None)
        if chunk.index == 2:
            assert reply.question and len(reply.tokens) <= 3
        kept = [s for r in commentator.context.rounds for s in r.user if s.kind == "question"]
        if kept:
            assert np.array_equal(kept[0].tokens, question[:4])  # cut to question_tokens
            turn = next(r for r in commentator.context.rounds if r.index == 2)
            kinds = [s.kind for s in turn.user]
            assert kinds.index("question") == len(kinds) - 2  # after the vision block, before <|im_end|>
        present.append(bool(kept))
    assert present == [False, False] + [True] * (gone_at - 2) + [False] * (len(chunks) - gone_at)


def test_the_cli_reads_questions_while_streaming(tiny_graphs, tmp_path):
    clip = write_clip(tmp_path / "clip.mp4", 4, 128, 96, 10)
    questions = tmp_path / "questions.txt"
    questions.write_text("what just happened?\n\nwho scored?\n")
    out = tmp_path / "out.jsonl"
    assert stream.main([str(clip), "--graphs", str(tiny_graphs), "--out", str(out), "--quiet", "--seed", "1",
                        "--max-new-tokens", "4", "--answer-max-new-tokens", "6", "--questions",
                        str(questions)]) == 0
    cues = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(cues) == 4 and [c["question"] for c in cues if "question" in c] == ["what just happened?",
                                                                                      "who scored?"]
    assert stream.main(["-", "--graphs", str(tiny_graphs), "--out", "-", "--questions", "-"]) == 1


def test_sources_a_client_may_open():
    from runtime.serve import allowed_sources, parse_args, source_kind

    assert [source_kind(s) for s in ("rtsp://u:p@cam/live", "HTTPS://x/a.m3u8", "/data/match.mp4", "/dev/video0",
                                     "-", "pipe:3", "upload:ab12", "push")] == \
        ["rtsp", "https", "file", "device", "pipe", "pipe", "upload", "push"]
    local, exposed = allowed_sources(parse_args([])), allowed_sources(parse_args(["--host", "0.0.0.0"]))
    assert {"rtsp", "http", "file", "device", "upload", "push"} <= local and "pipe" not in local
    assert local - exposed == {"file", "device"}  # beyond localhost a client may not read the server's files
    assert allowed_sources(parse_args(["--allow-sources", "rtsp, file"])) == {"rtsp", "file"}


def test_a_stream_says_when_it_skipped_chunks_and_answers_in_turn(tmp_path):
    """Stream.step on a scripted source and commentator turn: skipped chunks are an event before the next cue, a
    question is answered by the next chunk, the end is a state change, and the subtitles hold everything."""
    import threading

    from runtime.commentator import Reply
    from runtime.live import Arrival, Status
    from runtime.serve.streams import Stream
    from runtime.video import Chunk

    class Source:
        stop = threading.Event()
        items = [Status("connected", "tcp://cam", {"open_seconds": 0.1})] + [
            Arrival(Chunk(k, k, k + 1, None), 0.0, dropped, 0.0) for k, dropped in [(0, 0), (3, 2), (4, 2), (6, 3)]]

        def take(self, timeout):
            if not self.items:
                raise StopIteration
            return self.items.pop(0)

    class Commentator:
        def turn(self, chunk, question=None):  # a chunk whose reply needs no decode step
            text = f"answer to {question} ..." if question else f"second {chunk.index} ..."
            return Reply(chunk.index, chunk.start, chunk.end, [], text, 10, {"decode": 0.1}, None, question)
            yield

        def close(self):
            pass

    stream = Stream("s1", "tcp://cam", Commentator(), Source(), tmp_path, live=True)
    seen = []
    stream.listen(lambda: seen.append(1))
    while stream.step() or not stream.finished:
        if stream.cues == 1 and not stream.questions and not stream.answers:
            stream.ask("who scored?")
    events = [(e.type, e.data) for e in stream.since(0)]
    kinds = [kind for kind, _ in events]
    assert kinds == ["status", "status", "cue", "conversation.item.created", "dropped", "answer", "cue", "dropped",
                     "cue", "status"]
    assert [data for kind, data in events if kind == "dropped"] == [{"chunks": 2, "dropped": 2, "before": 3},
                                                                    {"chunks": 1, "dropped": 3, "before": 6}]
    answer = dict(events)["answer"]
    assert answer["question"] == "who scored?" and answer["text"] == "answer to who scored?" and answer["start"] == 3
    assert events[-1] == ("status", {"state": "ended"}) and len(seen) == len(events)
    lines = [json.loads(line) for line in (tmp_path / "commentary.jsonl").read_text().splitlines()]
    assert lines[0]["status"] == "connected" and [line.get("question") for line in lines[1:]] == \
        [None, "who scored?", None, None]
    assert "Q: who scored?\nanswer to who scored?" in (tmp_path / "commentary.srt").read_text()
    assert stream.info()["dropped"] == 3 and stream.commentator is None  # the cache goes with the stream's end


def test_questions_on_the_static_path_equal_the_dynamic_one(tiny_graphs, tmp_path):
    """A chunk with a question has a longer prompt than the static prefill length: it goes in pieces, and the
    capacity leaves room for a question per turn and answer-length replies: the greedy tokens are the same."""
    manifest, chunks = small_chunks(tiny_graphs, tmp_path)
    model, question = Model(manifest), "who scored the goal just now? " * 3
    tokens = {}
    for static in (False, True):
        config = StreamConfig(Settings(4, 2, 8, 8), Sampling(temperature=0), max_new_tokens=3, static=static,
                              question_tokens=64, answer_max_new_tokens=8)
        commentator = Commentator(model, config)
        tokens[static] = [commentator.step(c, question if c.index in (2, 3, 6) else None).tokens for c in chunks]
    assert tokens[True] == tokens[False]


def test_a_pushed_stream_ends_if_its_first_frame_never_comes():
    """An abandoned push stream (its page closed before the socket opened) frees its place; one that got frames
    waits for its client as long as it is connected."""
    import threading
    import time

    from runtime.serve.push import PushedFrames

    pushed, start = PushedFrames(first_frame_wait=0.3), time.monotonic()
    assert list(pushed.frames(threading.Event())) == [] and time.monotonic() - start < 5
    pushed = PushedFrames(first_frame_wait=0.3)
    assert pushed.push(pushed_frame(10.0, jpeg(synthetic_frame(0, 64, 48, 10))))
    frames = pushed.frames(threading.Event())
    assert next(frames).time == 0.0
    threading.Timer(0.8, pushed.close).start()
    start = time.monotonic()
    assert list(frames) == [] and time.monotonic() - start > 0.7  # ended by the close, not by the deadline
