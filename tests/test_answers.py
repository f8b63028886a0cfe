"""The built-in micro model answers questions, and the same answer comes back whichever way the question comes in:
the CLI's `--questions` (a script: "@SECONDS question"), the server's HTTP API and its WebSocket, the page. The
server and the page decide which chunk a question joins (the next one); the CLI is then asked the same question at
that chunk, greedy on both sides, and must say the same thing."""

import json

import aiohttp

from runtime import stream
from runtime.sample import write_world_clip
from runtime.stream import timed

from serve_client import Server, create, run

SEED = 21  # a held-out world (training uses seeds >= 1,000,000)


def world_clip(tmp_path, seconds: int = 600):
    return write_world_clip(tmp_path / "world.mp4", seconds, SEED)[0]


def cli_answers(graphs, clip, asked: dict[float, str], tmp_path) -> dict[float, tuple[str, str]]:
    """{chunk start: (question, answer)} of the CLI asked each question at that chunk."""
    script, out = tmp_path / "script.txt", tmp_path / "cli.jsonl"
    script.write_text("".join(f"@{start} {question}\n" for start, question in sorted(asked.items())))
    assert stream.main([str(clip), "--graphs", str(graphs), "--out", str(out), "--quiet", "--temperature", "0",
                        "--questions", str(script), "--duration", str(max(asked) + 1)]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    return {line["start"]: (line["question"], line["text"]) for line in lines if "question" in line}


def test_timed_question_lines():
    assert timed("@12.5 What colour is the square?\n") == (12.5, "What colour is the square?")
    assert timed("@soon what?") == (float("-inf"), "@soon what?")
    assert timed("what now?") == (float("-inf"), "what now?")


def test_the_server_answers_as_the_cli_does(micro_graphs, tmp_path):
    """Two questions to a file stream of the world (every chunk read, none dropped), one over HTTP and one over the
    WebSocket, asked after the first cue and after the first answer; the answers are the CLI's at the same chunks.
    (Whether they are true is tests/test_micro.py's business: here the chunk depends on timing.)"""
    clip = world_clip(tmp_path)
    questions = ["How many objects are there?", "What appeared last?"]

    async def body(server):
        async with aiohttp.ClientSession() as session:
            created = await create(session, server, str(clip), temperature=0)
            base = f"{server.url}/v1/streams/{created['id']}"
            answers, asked = [], 0
            async with session.ws_connect(f"{base}/ws") as ws:
                while len(answers) < len(questions):
                    message = await ws.receive_json(timeout=60)
                    assert message["type"] != "status" or message.get("state") != "ended", "the clip ran out"
                    if message["type"] == "answer":
                        answers.append(message)
                    if message["type"] == "cue" and asked == 0:
                        async with session.post(f"{base}/questions", json={"text": questions[0]}) as r:
                            assert r.status == 202
                        asked = 1
                    elif message["type"] == "answer" and asked == 1:
                        await ws.send_json({"type": "question", "text": questions[1]})
                        asked = 2
            async with session.post(f"{base}/stop") as response:
                assert response.status == 200
            return answers

    with Server(micro_graphs, data_dir=tmp_path / "data") as server:
        answers = run(body(server), limit=180)
    served = {a["start"]: (a["question"], a["text"]) for a in answers}
    assert [q for q, _ in served.values()] == questions
    assert cli_answers(micro_graphs, clip, {s: q for s, (q, _) in served.items()}, tmp_path) == served
