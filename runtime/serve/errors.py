"""How the server says no: an HTTP error is one JSON line, a socket's error is one event as in the OpenAI
Realtime API."""

import json

from aiohttp import web


def fail(kind: type, message: str, headers: dict | None = None) -> web.HTTPException:
    size = (0,) if kind is web.HTTPRequestEntityTooLarge else ()  # its one required argument; the text says it
    return kind(*size, text=json.dumps({"error": message}), content_type="application/json", headers=headers)


def error_event(code: str, message: str) -> dict:
    return {"type": "error", "error": {"type": "invalid_request_error", "code": code, "message": message}}


class Busy(Exception):
    """No room for another stream (503); the message says why."""
