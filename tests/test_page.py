"""The page at / in a real browser: Debian's chromium driven by Playwright, its webcam a fake camera playing a clip
written here. Cues appear, a typed question gets its answer in the list, stop works, and a screenshot is kept.
Skipped where chromium or playwright is missing, unless REQUIRE_BROWSER=1 (CI installs both)."""

import os
import shutil
from fractions import Fraction

import av
import pytest

from serve_client import CLUSTER, Server
from runtime.sample import synthetic_frame

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Flags that keep a headless chromium off the network (this machine's closed network refuses many connections)
# and give it a fake camera and an automatic yes to the camera prompt.
FLAGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--use-fake-ui-for-media-stream",
         "--use-fake-device-for-media-stream"]
TOKEN = "page-token"


def fake_camera(path, seconds: int = 4, width: int = 320, height: int = 240, fps: int = 10):
    """A y4m clip (what chromium's fake camera plays, looping)."""
    with av.open(str(path), "w", format="yuv4mpegpipe") as out:
        video = out.add_stream("rawvideo", rate=Fraction(fps))
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        for index in range(seconds * fps):
            frame = av.VideoFrame.from_ndarray(synthetic_frame(index, width, height, fps), format="rgb24")
            out.mux(video.encode(frame.reformat(format="yuv420p")))
        out.mux(video.encode(None))
    return path


def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if sync_playwright is None or not os.path.exists(CHROMIUM):
        if os.environ.get("REQUIRE_BROWSER"):
            pytest.fail("REQUIRE_BROWSER=1 but playwright or /usr/bin/chromium is missing")
        pytest.skip("needs pip playwright and Debian's chromium (apt-get install chromium)")
    return sync_playwright


@pytest.mark.parametrize("module", ["runtime.serve", "runtime.cluster"])
def test_the_page_comments_a_webcam_and_answers_a_question(tiny_graphs, tmp_path, module):
    """The same page against the one-process server and against the cluster (its frames and questions then go
    through the HTTP process to a Ray replica)."""
    sync_playwright = browser()
    extra = CLUSTER if module == "runtime.cluster" else ()
    if extra:
        from test_cluster import needs_ray

        needs_ray()
    camera = fake_camera(tmp_path / "camera.y4m")
    with Server(tiny_graphs, "--token", TOKEN, *extra, data_dir=tmp_path / "data", module=module, timeout=180) \
            as server, sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=[*FLAGS, f"--use-file-for-fake-video-capture={camera}"])
        try:
            page = chromium.new_page(viewport={"width": 1200, "height": 760})
            page.set_default_timeout(60_000)
            prompts = []
            page.on("dialog", lambda dialog: (prompts.append(dialog.message), dialog.accept(TOKEN)))
            page.goto(server.url + "/")
            page.fill("#query", "Describe what moves")
            page.click("#start")  # webcam is the default source; the server asks for the token first
            page.wait_for_selector("#cues li.cue")
            page.fill("#question", "what is moving?")
            page.click("#ask")
            answer = page.wait_for_selector("#cues li.answer")
            assert "Q: what is moving?" in answer.inner_text()
            page.wait_for_function("document.querySelector('#stats').textContent.includes('cache')")
            shot = tmp_path / "page.png"
            page.screenshot(path=str(shot))
            overlay = page.inner_text("#overlay")
            page.click("#stop")
            page.wait_for_selector("#start:not([disabled])")
            page.wait_for_function("document.querySelector('#stats').textContent.startsWith('ended')")
            links = [page.get_attribute(f"#{fmt}", "href") for fmt in ("vtt", "srt", "jsonl")]
        finally:
            chromium.close()
    assert prompts and "token" in prompts[0]
    assert overlay.strip() and shot.stat().st_size > 10_000
    assert all(link.endswith(f"commentary.{fmt}?token={TOKEN}") for link, fmt in zip(links, ("vtt", "srt", "jsonl")))
    print(f"screenshot: {shot}")


def test_the_page_gets_the_answer_the_cli_gives(micro_graphs, tmp_path):
    """A world clip uploaded through the page (File) and a question typed in it: the built-in model's answer shows
    in the list, and it is the one the CLI gives at the same chunk. The test makes the page's request greedy and
    not paced (temperature 0, every chunk read: the page plays an upload in real time, where a busy machine would
    drop chunks and the two contexts would differ)."""
    import json
    import urllib.request

    from test_answers import cli_answers, world_clip

    sync_playwright = browser()
    clip, question = world_clip(tmp_path), "How many objects are there?"

    def greedy(route):
        if route.request.method == "POST":
            settings = {**json.loads(route.request.post_data), "temperature": 0, "realtime": False}
            route.continue_(post_data=json.dumps(settings))
        else:
            route.continue_()

    with Server(micro_graphs, data_dir=tmp_path / "data") as server, sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            page = chromium.new_page(viewport={"width": 1200, "height": 760})
            page.set_default_timeout(60_000)
            page.route("**/v1/streams", greedy)
            page.goto(server.url + "/")
            page.select_option("#source-kind", "file")
            page.set_input_files("#file", str(clip))
            page.click("#start")
            page.wait_for_selector("#cues li.cue")
            page.fill("#question", question)
            page.click("#ask")
            shown = page.wait_for_selector("#cues li.answer").inner_text()
            page.click("#stop")
            page.wait_for_selector("#start:not([disabled])")
            link = page.get_attribute("#jsonl", "href")
        finally:
            chromium.close()
        lines = urllib.request.urlopen(urllib.request.Request(server.url + link)).read().decode().splitlines()
    answer = next(line for line in map(json.loads, lines) if "question" in line)
    assert answer["question"] == question and f"A: {answer['text']}" in shown
    start = answer["start"]
    assert cli_answers(micro_graphs, clip, {start: question}, tmp_path) == {start: (question, answer["text"])}
