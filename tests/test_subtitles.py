import json
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.subtitles import FORMATS, CueWriter, clean_text, format_for, parse_srt, parse_vtt

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("raw, clean", [
    ("The striker shoots ...", "The striker shoots"),
    ("  Goal! ...  ", "Goal!"),
    ("\n ...", ""),  # a silent second
    (" ...", ""),
    ("...", ""),
    ("", ""),
    ("Wait for it...", "Wait for it..."),  # an ellipsis of the commentary itself, not the suffix
    ("No suffix here", "No suffix here"),
    ("Two lines\nof text ...", "Two lines\nof text"),
    ("Only the last ... ...", "Only the last ..."),
])
def test_clean_text_strips_the_suffix_only_when_present(raw, clean):
    assert clean_text(raw) == clean


@pytest.mark.parametrize("path, fmt, expected", [
    ("out.vtt", None, "vtt"),
    ("OUT.SRT", None, "srt"),
    ("a/b.jsonl", None, "jsonl"),
    ("b.json", None, "jsonl"),
    ("b.ndjson", None, "jsonl"),
    ("-", None, "jsonl"),
    ("-", "vtt", "vtt"),
    ("out.vtt", "srt", "srt"),  # an explicit format wins over the extension
    ("out.txt", "JSONL", "jsonl"),
])
def test_format_for(path, fmt, expected):
    assert format_for(path, fmt) == expected


def test_format_for_rejects_what_it_cannot_tell():
    with pytest.raises(ValueError) as error:
        format_for("out.txt", None)
    assert "\n" not in str(error.value) and all(name in str(error.value) for name in FORMATS)
    with pytest.raises(ValueError, match="vtt, srt, jsonl"):
        format_for("out.vtt", "ass")
    with pytest.raises(ValueError):
        format_for("no_extension", None)


CHUNKS = [(0.0, 1.0, "Kick-off ..."), (1.0, 2.0, "\n ..."), (2.0, 3.0, "A long pass ...")]


def write_all(path: Path, chunks=CHUNKS, fmt: str | None = None) -> str:
    with CueWriter(str(path), fmt) as writer:
        for chunk in chunks:
            writer.write(*chunk)
    return path.read_text(encoding="utf-8")


def test_vtt_content(tmp_path):
    text = write_all(tmp_path / "out.vtt")
    assert text == ("WEBVTT\n\n"
                    "00:00:00.000 --> 00:00:01.000\nKick-off\n\n"
                    "00:00:02.000 --> 00:00:03.000\nA long pass\n\n")
    assert parse_vtt(text) == [(0.0, 1.0, "Kick-off"), (2.0, 3.0, "A long pass")]


def test_srt_content_numbers_only_shown_cues(tmp_path):
    text = write_all(tmp_path / "out.srt")
    assert text == ("1\n00:00:00,000 --> 00:00:01,000\nKick-off\n\n"
                    "2\n00:00:02,000 --> 00:00:03,000\nA long pass\n\n")
    assert parse_srt(text) == [(0.0, 1.0, "Kick-off"), (2.0, 3.0, "A long pass")]


def test_jsonl_keeps_one_object_per_chunk(tmp_path):
    lines = write_all(tmp_path / "out.jsonl").splitlines()
    assert [json.loads(line) for line in lines] == [
        {"start": 0.0, "end": 1.0, "text": "Kick-off"},
        {"start": 1.0, "end": 2.0, "text": ""},
        {"start": 2.0, "end": 3.0, "text": "A long pass"},
    ]
    assert lines[0] == '{"start": 0.0, "end": 1.0, "text": "Kick-off"}'


def test_vtt_header_is_written_before_any_cue(tmp_path):
    path = tmp_path / "out.vtt"
    with CueWriter(str(path)):
        assert path.read_text() == "WEBVTT\n\n"
        assert parse_vtt(path.read_text()) == []


def test_stdout_is_jsonl_and_stays_open(capsys):
    with CueWriter("-") as writer:
        writer.write(0.0, 1.0, "Hello ...")
    assert json.loads(capsys.readouterr().out) == {"start": 0.0, "end": 1.0, "text": "Hello"}
    assert not sys.stdout.closed


def test_hour_long_timestamps_and_rounding(tmp_path):
    chunks = [
        (0.0004, 0.9996, "rounds to the millisecond ..."),
        (59.9996, 61.0, "carries into the minute ..."),
        (3599.9999, 3601.0, "carries into the hour ..."),
        (36000.0, 36001.5, "ten hours in ..."),
        (359999.0, 360000.0, "a hundred hours ..."),
    ]
    vtt = write_all(tmp_path / "out.vtt", chunks)
    assert "00:00:00.000 --> 00:00:01.000\n" in vtt
    assert "00:01:00.000 --> 00:01:01.000\n" in vtt
    assert "01:00:00.000 --> 01:00:01.000\n" in vtt
    assert "10:00:00.000 --> 10:00:01.500\n" in vtt
    assert "99:59:59.000 --> 100:00:00.000\n" in vtt
    assert [cue[:2] for cue in parse_vtt(vtt)] == [(0.0, 1.0), (60.0, 61.0), (3600.0, 3601.0), (36000.0, 36001.5),
                                                   (359999.0, 360000.0)]
    srt = write_all(tmp_path / "out.srt", chunks)
    assert "10:00:00,000 --> 10:00:01,500\n" in srt
    assert len(parse_srt(srt)) == 5
    objects = [json.loads(line) for line in write_all(tmp_path / "out.jsonl", chunks).splitlines()]
    assert (objects[1]["start"], objects[2]["start"]) == (60.0, 3600.0)


def test_float_drift_between_chunks_is_no_overlap(tmp_path):
    # Chunk edges computed as sums of 0.1 differ in the last bits; rounding puts them on the same millisecond.
    edges = [sum([0.1] * n) for n in range(11)]
    chunks = [(edges[i], edges[i + 1], f"cue {i} ...") for i in range(10)]
    assert len(parse_vtt(write_all(tmp_path / "out.vtt", chunks))) == 10


def test_writer_rejects_overlapping_backwards_or_empty_cues(tmp_path):
    with CueWriter(str(tmp_path / "out.vtt")) as writer:
        writer.write(1.0, 2.0, "ok")
        with pytest.raises(ValueError):
            writer.write(1.5, 3.0, "overlaps")
        with pytest.raises(ValueError):
            writer.write(3.0, 3.0, "empty")
        with pytest.raises(ValueError):
            writer.write(4.0, 3.0, "backwards")
    with CueWriter(str(tmp_path / "out.jsonl")) as writer, pytest.raises(ValueError):
        writer.write(-1.0, 0.5, "negative")


@pytest.mark.parametrize("fmt, parse", [("vtt", parse_vtt), ("srt", parse_srt)])
def test_cue_text_is_sanitized(tmp_path, fmt, parse):
    chunks = [
        (0.0, 1.0, "arrow --> here and ---> there ..."),
        (1.0, 2.0, "first\n\n\nsecond\n   \nthird ..."),
        (2.0, 3.0, "\n\n   \n ..."),  # nothing but blank lines: silent
        (3.0, 4.0, "1 < 2 & 3 > 2 ..."),
        (4.0, 5.0, "00:00:09.000 --> 00:00:10.000\n5 ..."),  # text that looks like a timing line
    ]
    text = write_all(tmp_path / f"out.{fmt}", chunks)
    assert "\n\n\n" not in text
    for block in text.split("\n\n"):
        assert block.count("-->") <= 1
    assert parse(text) == [
        (0.0, 1.0, "arrow -> here and -> there"),
        (1.0, 2.0, "first\nsecond\nthird"),
        (3.0, 4.0, "1 < 2 & 3 > 2"),
        (4.0, 5.0, "00:00:09.000 -> 00:00:10.000\n5"),
    ]


def test_vtt_escapes_markup(tmp_path):
    text = write_all(tmp_path / "out.vtt", [(0.0, 1.0, "<b>bold</b> & co ...")])
    assert "&lt;b>bold&lt;/b> &amp; co\n" in text
    assert parse_vtt(text)[0][2] == "<b>bold</b> & co"


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_cue_is_flushed_when_written(tmp_path, fmt):
    path = tmp_path / f"out.{fmt}"
    with CueWriter(str(path)) as writer:
        for n in range(1, 4):
            writer.write(n - 1.0, float(n), f"cue {n} ...")
            with open(path, encoding="utf-8") as reader:  # another handle, before close
                seen = reader.read()
            if fmt == "vtt":
                assert len(parse_vtt(seen)) == n
            elif fmt == "srt":
                assert len(parse_srt(seen)) == n
            else:
                assert len(seen.splitlines()) == n


@pytest.mark.parametrize("fmt, count", [
    ("vtt", lambda text: len(parse_vtt(text))),
    ("srt", lambda text: len(parse_srt(text))),
    ("jsonl", lambda text: len([json.loads(line) for line in text.splitlines()])),
])
def test_a_crash_loses_no_written_cue(tmp_path, fmt, count):
    # os._exit skips every close, finalizer and buffer flush: what is on disk is what the writer flushed.
    path = tmp_path / f"out.{fmt}"
    script = ("import os\nfrom runtime.subtitles import CueWriter\n"
              f"writer = CueWriter({str(path)!r})\n"
              "for n in range(3):\n    writer.write(n, n + 1, f'cue {n} ...')\n"
              "os._exit(3)\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 3, result.stderr
    assert count(path.read_text(encoding="utf-8")) == 3


def test_abandoned_writer_leaves_a_valid_file(tmp_path):
    path = tmp_path / "out.vtt"
    writer = CueWriter(str(path))
    for n in range(3):
        writer.write(n, n + 1, f"cue {n} ...")
    assert [cue[2] for cue in parse_vtt(path.read_text())] == ["cue 0", "cue 1", "cue 2"]
    writer.close()


VALID_VTT = "WEBVTT\n\n00:00:00.000 --> 00:00:01.000\nA\n\n00:00:01.000 --> 00:00:02.000\nB\n"
VALID_SRT = "1\n00:00:00,000 --> 00:00:01,000\nA\n\n2\n00:00:01,000 --> 00:00:02,000\nB\n"


def test_validators_accept_what_the_formats_allow():
    assert parse_vtt(VALID_VTT) == [(0.0, 1.0, "A"), (1.0, 2.0, "B")]
    assert parse_vtt("\ufeffWEBVTT - a title\r\n\r\nid-1\r\n01:02.500 --> 01:03.000\r\nA\r\n") == [(62.5, 63.0, "A")]
    assert parse_srt(VALID_SRT) == [(0.0, 1.0, "A"), (1.0, 2.0, "B")]
    assert parse_srt("") == []


@pytest.mark.parametrize("text", [
    "",
    "WEBVT\n\n00:00:00.000 --> 00:00:01.000\nA\n",
    "WEBVTT\n00:00:00.000 --> 00:00:01.000\nA\n",  # no blank line after the header
    VALID_VTT.replace("00:00:01.000 --> 00:00:02.000", "00:00:01,000 --> 00:00:02.000"),
    VALID_VTT.replace("00:00:01.000 --> 00:00:02.000", "00:00:61.000 --> 00:01:02.000"),
    VALID_VTT.replace("00:00:01.000 --> 00:00:02.000", "00:00:00.500 --> 00:00:02.000"),  # overlaps
    VALID_VTT.replace("00:00:01.000 --> 00:00:02.000", "00:00:02.000 --> 00:00:01.000"),  # ends before it starts
    VALID_VTT.replace("\nB\n", "\n"),  # no text
    VALID_VTT.replace("\nB\n", "\nB --> C\n"),
    VALID_VTT.replace("\nB\n", "\n<b>B</b>\n"),
    "WEBVTT\n\nA\nB\n",  # identifier without timing
])
def test_parse_vtt_rejects_malformed(text):
    with pytest.raises(ValueError):
        parse_vtt(text)


@pytest.mark.parametrize("text", [
    VALID_SRT.replace("2\n", "3\n", 1),  # numbering gap
    VALID_SRT.replace("1\n", "0\n", 1),
    VALID_SRT.replace("00:00:01,000 --> 00:00:02,000", "00:00:01.000 --> 00:00:02,000"),
    VALID_SRT.replace("00:00:01,000 --> 00:00:02,000", "0:00:01,000 --> 00:00:02,000"),
    VALID_SRT.replace("00:00:01,000 --> 00:00:02,000", "00:00:00,999 --> 00:00:02,000"),  # overlaps
    VALID_SRT.replace("00:00:01,000 --> 00:00:02,000", "00:00:01,000 --> 00:00:01,000"),  # zero length
    VALID_SRT.replace("\nB\n", "\n"),  # no text
    "1\n",
    "WEBVTT\n\n" + VALID_SRT,
])
def test_parse_srt_rejects_malformed(text):
    with pytest.raises(ValueError):
        parse_srt(text)
