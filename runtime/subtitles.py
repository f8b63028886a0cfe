"""Subtitles: one cue per chunk of commentary, written as WebVTT, SRT or JSON lines while the stream runs.

Each cue is flushed as soon as it is written, so a viewer or a `tail -f` sees it live and a stream that is
killed keeps everything said so far. `parse_vtt` and `parse_srt` are strict validators of what the writer
produces: tests use them to prove the files are well-formed.
"""

import json
import re
import sys
from pathlib import Path
from types import TracebackType
from typing import TextIO

FORMATS = ("vtt", "srt", "jsonl")
_EXTENSIONS = {".vtt": "vtt", ".srt": "srt", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl"}

# The trained model closes every second with " ..." and says just "..." (after a newline) when nothing happens.
_CONTINUATION = re.compile(r"(?:^|\s)\.\.\.\Z")


def clean_text(text: str) -> str:
    """The model's raw text for one chunk without its trailing " ..." (only when present); a silent chunk is ""."""
    text = text.strip()
    return _CONTINUATION.sub("", text).strip()


def format_for(path: str, fmt: str | None) -> str:
    """The format to write `path` in: `fmt` if given, else from the extension; stdout ("-") defaults to jsonl."""
    if fmt is not None:
        if fmt.lower() not in FORMATS:
            raise ValueError(f"unknown subtitle format {fmt!r}: use one of {', '.join(FORMATS)}")
        return fmt.lower()
    if path == "-":
        return "jsonl"
    suffix = Path(path).suffix.lower()
    if suffix not in _EXTENSIONS:
        raise ValueError(f"cannot tell the subtitle format of {path!r}: name it .vtt, .srt or .jsonl, "
                         f"or pass a format ({', '.join(FORMATS)})")
    return _EXTENSIONS[suffix]


def _milliseconds(seconds: float) -> int:
    # Rounding once to whole milliseconds, then splitting with integer arithmetic, is what keeps 59.9996 s
    # from printing as "00:00:60.000": the carry into minutes and hours happens in divmod, not in formatting.
    return round(seconds * 1000)


def _timestamp(ms: int, decimal_mark: str) -> str:
    """HH:MM:SS.mmm (VTT) or HH:MM:SS,mmm (SRT); hours grow past two digits for streams of 100 hours and more."""
    seconds, ms = divmod(ms, 1000)
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours:02d}:{minutes:02d}:{seconds:02d}{decimal_mark}{ms:03d}"


def _cue_lines(text: str) -> str:
    # A blank line ends a cue in both formats and "-->" marks a timing line, so neither may reach the cue text.
    # A run of dashes goes as a whole, so that "--->" cannot leave a new "-->" behind.
    lines = (re.sub(r"-{2,}>", "->", line).strip() for line in text.splitlines())
    return "\n".join(line for line in lines if line)


def _escape_vtt(text: str) -> str:
    # WebVTT cue text is markup: "<" opens a tag and "&" an entity, so a literal one must be escaped.
    return text.replace("&", "&amp;").replace("<", "&lt;")


def _unescape_vtt(text: str) -> str:
    return text.replace("&lt;", "<").replace("&amp;", "&")


class CueWriter:
    """Writes a subtitle file ("-" is stdout) one cue per `write`; use it as a context manager.

    Every cue is flushed, not fsynced: a flush hands it to the operating system, which keeps it through a crash
    or Ctrl-C of this process, the failure a live commentator has to survive. Only a power cut could still lose
    it, and an fsync per chunk would block the real-time loop on slow or network disks for that guarantee.
    """

    def __init__(self, path: str, fmt: str | None = None) -> None:
        self.fmt = format_for(path, fmt)
        self._owns_file = path != "-"
        # newline="" writes "\n" as is on every platform; both formats and browsers accept it.
        self._file: TextIO = open(path, "w", encoding="utf-8", newline="") if self._owns_file else sys.stdout
        self._end_ms = 0  # where the last cue ended: cues must follow one another
        self._srt_number = 0  # SRT numbers only the cues it shows, so silent chunks leave no gaps
        if self.fmt == "vtt":
            self._emit("WEBVTT\n\n")  # a player can open the file before the first cue arrives

    def write(self, start: float, end: float, text: str, extra: dict | None = None,
              question: str | None = None) -> None:
        """One chunk from `start` to `end` seconds with the model's raw text (cleaned here); `extra` fields
        (a live stream's lag and drop count) go into JSON lines only. A chunk that answers a `question` shows it
        on a line of its own before the answer ("Q: ..."); JSON lines give it its own field."""
        start_ms, end_ms = _milliseconds(start), _milliseconds(end)
        if start_ms < self._end_ms or end_ms <= start_ms:
            raise ValueError(f"cue {start:.3f}-{end:.3f} s must end after it starts and start at or after "
                             f"{self._end_ms / 1000:.3f} s, where the previous one ended")
        self._end_ms = end_ms
        text = clean_text(text)
        if self.fmt == "jsonl":
            # One object per chunk, silent ones included, so a consumer sees every second of the stream.
            cue = {"start": start_ms / 1000, "end": end_ms / 1000, "text": text, **(extra or {})}
            if question is not None:
                cue["question"] = question
            self._emit(json.dumps(cue, ensure_ascii=False) + "\n")
            return
        text = _cue_lines(text if question is None else f"Q: {question}\n{text}")
        if not text:
            return  # a silent chunk shows nothing on screen
        if self.fmt == "vtt":
            self._emit(f"{_timestamp(start_ms, '.')} --> {_timestamp(end_ms, '.')}\n{_escape_vtt(text)}\n\n")
        else:
            self._srt_number += 1
            timing = f"{_timestamp(start_ms, ',')} --> {_timestamp(end_ms, ',')}"
            self._emit(f"{self._srt_number}\n{timing}\n{text}\n\n")

    def status(self, event: dict) -> None:
        """A live source's state change, e.g. {"status": "reconnecting", ...}: JSON lines only (no cue)."""
        if self.fmt == "jsonl":
            self._emit(json.dumps(event, ensure_ascii=False) + "\n")

    def _emit(self, chunk: str) -> None:
        self._file.write(chunk)  # one write per cue, so a cue is never flushed half-written by us
        self._file.flush()

    def close(self) -> None:
        if self._owns_file:
            self._file.close()
        else:
            self._file.flush()  # stdout belongs to the caller

    def __enter__(self) -> "CueWriter":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()


# Strict validators. They accept what the writer produces and what the formats allow around it (a BOM, CRLF,
# extra blank lines between cues, WebVTT cue identifiers and hour-less timestamps), and reject the rest,
# including overlapping cues, which WebVTT itself would allow but a commentary track must never have.

_VTT_TIME = re.compile(r"(?:(\d{2,}):)?([0-5]\d):([0-5]\d)\.(\d{3})")
_SRT_TIME = re.compile(r"(\d{2,}):([0-5]\d):([0-5]\d),(\d{3})")
_TIMING = re.compile(r"(\S+)[ \t]+-->[ \t]+(\S+)")


def _blocks(text: str) -> list[str]:
    """The file cut at blank lines."""
    text = text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n").strip("\n")
    return re.split(r"\n{2,}", text) if text else []


def _parse_time(stamp: str, pattern: re.Pattern[str], where: str) -> int:
    match = pattern.fullmatch(stamp)
    if not match:
        raise ValueError(f"{where}: bad timestamp {stamp!r}")
    hours, minutes, seconds, ms = (int(group or 0) for group in match.groups())
    return ((hours * 60 + minutes) * 60 + seconds) * 1000 + ms


def _parse_cue(lines: list[str], pattern: re.Pattern[str], end_before: int, where: str) -> tuple[int, int, str]:
    """A timing line and its text lines, as (start ms, end ms, text)."""
    timing = _TIMING.fullmatch(lines[0])
    if not timing:
        raise ValueError(f"{where}: expected 'start --> end', got {lines[0]!r}")
    start, end = (_parse_time(stamp, pattern, where) for stamp in timing.groups())
    if end <= start:
        raise ValueError(f"{where}: ends at or before it starts")
    if start < end_before:
        raise ValueError(f"{where}: starts before the previous cue ends")
    text = lines[1:]
    if not text:
        raise ValueError(f"{where}: no text")
    for line in text:
        if not line.strip() or "-->" in line:
            raise ValueError(f"{where}: text line {line!r} is blank or holds '-->'")
    return start, end, "\n".join(text)


def _seconds(cues: list[tuple[int, int, str]]) -> list[tuple[float, float, str]]:
    return [(start / 1000, end / 1000, text) for start, end, text in cues]


def parse_vtt(text: str) -> list[tuple[float, float, str]]:
    """The cues of a WebVTT file as (start s, end s, text); ValueError on anything malformed."""
    blocks = _blocks(text)
    if not blocks or not re.fullmatch(r"WEBVTT(?:[ \t][^\n]*)?", blocks[0]):
        raise ValueError("WebVTT: the file must start with a line 'WEBVTT' followed by a blank line")
    cues: list[tuple[int, int, str]] = []
    for number, block in enumerate(blocks[1:], 1):
        lines = block.split("\n")
        if "-->" not in lines[0]:
            lines = lines[1:]  # a cue identifier
        where = f"WebVTT cue {number}"
        if not lines:
            raise ValueError(f"{where}: no timing line")
        start, end, cue_text = _parse_cue(lines, _VTT_TIME, cues[-1][1] if cues else 0, where)
        if "<" in cue_text:
            raise ValueError(f"{where}: unescaped '<' (the writer writes no markup)")
        cues.append((start, end, _unescape_vtt(cue_text)))
    return _seconds(cues)


def parse_srt(text: str) -> list[tuple[float, float, str]]:
    """The cues of an SRT file as (start s, end s, text); ValueError on anything malformed."""
    cues: list[tuple[int, int, str]] = []
    for number, block in enumerate(_blocks(text), 1):
        lines = block.split("\n")
        where = f"SRT cue {number}"
        if lines[0] != str(number):
            raise ValueError(f"{where}: numbered {lines[0]!r}, expected {number}")
        if len(lines) < 2:
            raise ValueError(f"{where}: no timing line")
        cues.append(_parse_cue(lines[1:], _SRT_TIME, cues[-1][1] if cues else 0, where))
    return _seconds(cues)
