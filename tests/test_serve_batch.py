"""The server batches the streams that are decoding (the default), on the host path and the static path, and can be
told not to (--no-batch): four file streams of different frame sizes, windows and start times, one with questions,
served at once, each write exactly the subtitles that the same stream gives alone (greedy, in-process reference).

A question joins the next chunk the stream starts, which depends on timing; the reference asks it at the chunk its
answer came in, so the comparison does not."""

import asyncio
import json

import aiohttp
import pytest

from serve_client import Server, create, run, sse
from runtime import stream as cli
from runtime.commentator import Commentator
from runtime.manifest import Manifest
from runtime.model import Model
from runtime.sample import write_clip
from runtime.subtitles import clean_text
from runtime.video import read_chunks

SIZES = [(64, 64), (128, 96), (96, 64), (64, 128)]  # width, height per stream
SECONDS = 10


def settings(k: int) -> dict:
    return dict(window_size=2 + k, text_round=3, text_sink=8, text_window=8, max_new_tokens=5,
                answer_max_new_tokens=7, temperature=0, seed=1)


def alone(graphs, clip, k: int, questions: dict[int, str], server_flags: list[str]) -> list[dict]:
    """The stream served by itself in this process: {start, end, text[, question]} per chunk."""
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in settings(k).items()]
    args = cli.parse_args([str(clip), *flags, *server_flags])
    manifest = Manifest.load(graphs)
    commentator = Commentator(Model(manifest), cli.config_from(args, questions=True))
    out = []
    chunking = cli.chunking(args, manifest)
    for chunk in read_chunks(str(clip), **{k: v for k, v in chunking.items() if k != "min_side"}):
        reply = commentator.step(chunk, questions.get(chunk.index))
        out.append({"start": reply.start, "end": reply.end, "text": clean_text(reply.text),
                    **({"question": reply.question} if reply.question else {})})
    return out


@pytest.mark.parametrize("flags", [["--batch"], ["--batch", "--static", "--cache-capacity", "1500"], ["--no-batch"]],
                         ids=["batched", "batched-static", "no-batch"])
def test_streams_served_together_write_what_each_writes_alone(tiny_graphs, tmp_path, flags):
    clips = [write_clip(tmp_path / f"clip{k}.mp4", SECONDS, w, h, 4) for k, (w, h) in enumerate(SIZES)]

    async def body(server):
        async with aiohttp.ClientSession() as session:
            streams = []
            for k, clip in enumerate(clips):
                streams.append(await create(session, server, str(clip), **settings(k)))
                if k == 2:
                    base = f"{server.url}/v1/streams/{streams[2]['id']}"
                    for text in ("what is there?", "and now?"):
                        async with session.post(f"{base}/questions", json={"text": text}) as response:
                            assert response.status == 202
                await asyncio.sleep(0.2 * k)  # joining at different times
            lines = []
            for created in streams:
                url = f"{server.url}/v1/streams/{created['id']}"
                await sse(session, f"{url}/events", limit=120)  # until the stream ends
                async with session.get(f"{url}/commentary.jsonl") as response:
                    lines.append([json.loads(line) for line in (await response.text()).splitlines()])
            async with session.get(f"{server.url}/v1/streams") as response:
                listing = await response.json()
        return lines, [s["state"] for s in listing["streams"]], listing["batch"]

    with Server(tiny_graphs, "--max-streams", "4", *flags, data_dir=tmp_path / "data") as server:
        lines, states, batch = run(body(server), limit=240)
    assert states == ["ended"] * 4
    if "--no-batch" in flags:
        assert batch is None
    else:  # the streams overlapped and shared decode calls
        assert batch["rows_decoded"] > 1.2 * batch["decode_calls"], batch
    static = [f for f in flags if f not in ("--batch", "--no-batch")]
    for k, (clip, written) in enumerate(zip(clips, lines)):
        assert len(written) == SECONDS  # a file not played live: every chunk commented
        asked = {round(line["start"]): line["question"] for line in written if "question" in line}
        assert len(asked) == (2 if k == 2 else 0)
        assert written == alone(tiny_graphs, clip, k, asked, static), k
