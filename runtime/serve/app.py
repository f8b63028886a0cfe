"""The commentary server's HTTP side: the aiohttp application, its middlewares (errors, origin, token) and the
REST routes that create, list, stop, delete, question and resume streams, take uploads and give their subtitles.
Following a stream's events is events.py's; the streams themselves are a backend's: `Local` (local.py: this
process's model and scheduler) for runtime.serve, `Cluster` (runtime/cluster) for replicas on Ray.
"""

import asyncio
import hmac
import json
import secrets
import shutil
from pathlib import Path

from aiohttp import web

from .. import stream as cli
from ..manifest import Manifest
from .errors import Busy, fail
from .events import Following
from .options import (KEEP_FINISHED, MAX_FRAMES_PER_CHUNK, MAX_NEW_TOKENS, MAX_PENDING, MAX_QUESTION, SETTINGS,
                      allowed_sources, source_kind)
from .streams import Stream

PAGE = Path(__file__).with_name("web") / "index.html"


class Server(Following):
    """The app's state (the streams' backend, the data folder) and its routes."""

    def __init__(self, args, manifest: Manifest, backend, max_streams: int, data_dir: Path):
        self.args, self.manifest, self.backend = args, manifest, backend
        self.max_streams, self.data_dir = max_streams, data_dir
        self.allowed = allowed_sources(args)
        self.closing = False
        self._opening = 0  # streams being opened (off the event loop): they count against --max-streams
        (data_dir / "uploads").mkdir(parents=True, exist_ok=True)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.args.max_body,
                              middlewares=[self.errors, self.same_origin, self.auth])
        app.router.add_get("/", self.page)
        app.router.add_get("/v1/streams", self.list)
        app.router.add_post("/v1/streams", self.create)
        app.router.add_post("/v1/uploads", self.upload)
        app.router.add_get("/v1/streams/{id}", self.get)
        app.router.add_delete("/v1/streams/{id}", self.delete)
        app.router.add_post("/v1/streams/{id}/stop", self.stop)
        app.router.add_get("/v1/streams/{id}/events", self.events)
        app.router.add_get("/v1/streams/{id}/commentary.{fmt}", self.download)
        app.router.add_post("/v1/streams/{id}/questions", self.question)
        app.router.add_post("/v1/streams/{id}/resume", self.resume)
        app.router.add_get("/v1/streams/{id}/ws", self.socket)
        app.on_shutdown.append(self.shutdown)
        return app

    # Middlewares: every error is one JSON line; with --token, everything but the page needs the token.
    @web.middleware
    async def errors(self, request, handler):
        try:
            return await handler(request)
        except web.HTTPException as error:
            if error.status < 400:
                raise
            message = error.text if error.content_type == "application/json" else json.dumps({"error": error.reason})
            return web.Response(status=error.status, text=message, content_type="application/json",
                                headers={k: v for k, v in error.headers.items() if k in ("WWW-Authenticate",
                                                                                         "Retry-After")})
        except Exception as error:  # a bug or a race (a download while its stream is deleted): still one JSON line
            return web.json_response({"error": f"internal error: {type(error).__name__}: {error}"}, status=500)

    @web.middleware
    async def same_origin(self, request, handler):
        """Any web page the user visits could otherwise drive this server (it answers on localhost, and without
        --token to anyone): a browser's request from another origin is refused. Clients that are not browsers
        (curl, programs) send no Origin."""
        origin = request.headers.get("Origin")
        if origin is not None and origin.partition("://")[2].rstrip("/") != request.host:
            raise fail(web.HTTPForbidden, f"requests from other origins ({origin}) are refused")
        return await handler(request)

    @web.middleware
    async def auth(self, request, handler):
        if self.args.token and request.path != "/" and not self._authorized(request):
            raise fail(web.HTTPUnauthorized, "missing or wrong token: send 'Authorization: Bearer TOKEN' "
                       "(event streams and sockets: ?token=TOKEN)", {"WWW-Authenticate": "Bearer"})
        return await handler(request)

    def _authorized(self, request) -> bool:
        header = request.headers.get("Authorization", "")
        offered = [header.removeprefix("Bearer ").strip(), request.query.get("token", "")]
        offered += [p.strip().removeprefix("bearer.") for p in request.headers.get("Sec-WebSocket-Protocol",
                                                                                   "").split(",")]
        return any(hmac.compare_digest(o.encode(), self.args.token.encode()) for o in offered if o)

    async def page(self, request):
        return web.FileResponse(PAGE, headers={"Cache-Control": "no-cache"})

    def find(self, request, lost_too: bool = False) -> Stream:
        """The stream the URL names; 410 for one whose cluster replica was lost (unless `lost_too`: its subtitles
        and its deletion are still served)."""
        stream = self.backend.get(request.match_info["id"])
        if stream is None:
            raise fail(web.HTTPNotFound, f"no stream {request.match_info['id']!r}")
        if getattr(stream, "lost", None) and not lost_too:
            raise fail(web.HTTPGone, stream.lost)
        return stream

    async def list(self, request):
        streams = [s.info() for s in self.backend.all()]
        return web.json_response({"streams": streams, "active": self.backend.active(),
                                  "max_streams": self.max_streams, **self.backend.counters()})

    async def get(self, request):
        return web.json_response(self.find(request).info())

    async def delete(self, request):
        stream = self.find(request, lost_too=True)
        self.backend.delete(stream.id)
        return web.json_response({"id": stream.id, "deleted": True})

    async def stop(self, request):
        stream = self.find(request)
        self.backend.stop(stream)
        return web.json_response({"id": stream.id, "stopped": True})

    async def resume(self, request):
        """A stream from a URL whose cluster replica was lost goes on on another replica: a fresh context, the
        same subtitles and events."""
        stream = self.find(request, lost_too=True)
        try:
            await self.backend.resume(stream)
        except LookupError as error:
            raise fail(web.HTTPConflict, str(error)) from None
        except Busy as error:
            raise fail(web.HTTPServiceUnavailable, str(error), {"Retry-After": "5"}) from None
        return web.json_response(stream.info())

    async def create(self, request):
        body = await json_body(request)
        source = body.pop("source", None)
        if not isinstance(source, str) or not source:
            raise fail(web.HTTPBadRequest, "give a 'source': a URL, a file path, 'upload:ID' or 'push'")
        what = source_kind(source)
        if what not in self.allowed:
            raise fail(web.HTTPForbidden, f"sources of kind {what!r} are not allowed here (--allow-sources)")
        args = cli.parse_args(["--", source])  # a source like '-h' is a source, not an option
        for key, value in body.items():
            wanted = SETTINGS.get(key)
            if wanted is None:
                raise fail(web.HTTPBadRequest, f"unknown field {key!r}; the settings are {', '.join(SETTINGS)}")
            if not isinstance(value, wanted) or isinstance(value, bool) != (wanted is bool):
                raise fail(web.HTTPBadRequest, f"{key!r} has the wrong type")
            setattr(args, key, value)
        args.static, args.cache_capacity = self.args.static, self.args.cache_capacity
        # One stream's settings must not starve the others or the machine: frames, pixels and tokens are capped.
        if args.fps * args.chunk_duration > MAX_FRAMES_PER_CHUNK or \
                (args.max_pixels or 0) > self.manifest["preprocess"]["max_pixels"] or \
                max(args.max_new_tokens, args.answer_max_new_tokens) > MAX_NEW_TOKENS:
            raise fail(web.HTTPBadRequest, f"at most {MAX_FRAMES_PER_CHUNK} frames per chunk, the model's "
                       f"max_pixels ({self.manifest['preprocess']['max_pixels']}) and {MAX_NEW_TOKENS} new tokens")
        try:
            cli.config_from(args, questions=True)  # checked here (400); the backend builds the stream from `args`
        except cli.UsageError as error:
            raise fail(web.HTTPBadRequest, str(error)) from None
        folder = self.data_dir / secrets.token_hex(8)
        if what == "upload":
            upload = self.data_dir / "uploads" / source.partition(":")[2]
            if not source.partition(":")[2].isalnum() or not upload.is_file():
                raise fail(web.HTTPBadRequest, f"no upload {source!r}; POST the file to /v1/uploads first")
        elif what == "file" and not Path(source).is_file():
            raise fail(web.HTTPBadRequest, f"{source}: no such file on the server")
        self._room()
        folder.mkdir()
        if what == "upload":
            args.video = str(shutil.move(upload, folder / "upload"))
        self._opening += 1
        try:  # the tokenizer loads from disk, a replica answers over the network: off the event loop
            stream = await asyncio.get_running_loop().run_in_executor(None, self.backend.open, folder.name, args,
                                                                      source, folder)
        except BaseException as error:
            if what == "upload" and (folder / "upload").exists():  # the upload stays for a retry
                shutil.move(folder / "upload", upload)
            shutil.rmtree(folder, ignore_errors=True)
            if isinstance(error, Busy):
                raise fail(web.HTTPServiceUnavailable, str(error), {"Retry-After": "5"}) from None
            if isinstance(error, ValueError):  # the stream could not be opened (a cluster replica says why)
                raise fail(web.HTTPBadRequest, str(error)) from None
            raise
        finally:
            self._opening -= 1
        self._forget_old()
        return web.json_response(stream.info(), status=201)

    def _room(self) -> None:
        reason = self.backend.full(self._opening)
        if reason is not None:
            raise fail(web.HTTPServiceUnavailable, reason, {"Retry-After": "5"})

    def _forget_old(self) -> None:
        finished = sorted((s for s in self.backend.all() if s.finished), key=lambda s: s.created)
        for stream in finished[:max(0, len(finished) - KEEP_FINISHED + 1)]:
            self.backend.delete(stream.id)

    async def upload(self, request):
        limit = self.args.max_upload * 1024 * 1024
        too_large = fail(web.HTTPRequestEntityTooLarge, f"uploads are limited to {self.args.max_upload} MB "
                         "(--max-upload)")
        if (request.content_length or 0) > limit:
            raise too_large
        id = secrets.token_hex(8)
        path, size = self.data_dir / "uploads" / id, 0
        try:
            with open(path, "wb") as out:
                async for piece in request.content.iter_chunked(1 << 16):
                    size += len(piece)
                    if size > limit:  # a body without a length, or one longer than it said
                        raise too_large
                    out.write(piece)
        except BaseException:  # too large, or the client went away mid-upload: no partial file stays
            path.unlink(missing_ok=True)
            raise
        return web.json_response({"source": f"upload:{id}", "bytes": size}, status=201)

    async def question(self, request):
        stream = self.find(request)
        body = await json_body(request)
        self._ask(stream, body.get("text"))
        return web.json_response({"question": body["text"].strip(), "asked": stream.media_time}, status=202)

    def _ask(self, stream: Stream, text) -> None:
        if not isinstance(text, str) or not text.strip() or len(text) > MAX_QUESTION:
            raise fail(web.HTTPBadRequest, f"a question is a non-empty 'text' of at most {MAX_QUESTION} characters")
        if stream.finished:
            raise fail(web.HTTPConflict, f"stream {stream.id} has {stream.state}")
        if len(stream.questions) >= MAX_PENDING:
            raise fail(web.HTTPTooManyRequests, f"{MAX_PENDING} questions are already waiting for a chunk")
        stream.ask(text.strip())

    async def download(self, request):
        stream, fmt = self.find(request, lost_too=True), request.match_info["fmt"]
        types = {"vtt": "text/vtt", "srt": "application/x-subrip", "jsonl": "application/jsonl"}
        if fmt not in types:
            raise fail(web.HTTPNotFound, "commentary comes as .vtt, .srt or .jsonl")
        text = (stream.folder / f"commentary.{fmt}").read_text(encoding="utf-8")
        return web.Response(text=text, content_type=types[fmt], charset="utf-8", headers={
            "Content-Disposition": f'attachment; filename="commentary-{stream.id}.{fmt}"'})

    async def shutdown(self, app) -> None:
        self.closing = True


async def json_body(request) -> dict:
    """The request's JSON object; the app's client_max_size (--max-body) bounds what is read."""
    try:
        body = await request.json()
    except web.HTTPRequestEntityTooLarge:
        raise fail(web.HTTPRequestEntityTooLarge, "the request body is too large (--max-body)") from None
    except ValueError:
        raise fail(web.HTTPBadRequest, "the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise fail(web.HTTPBadRequest, "the body must be a JSON object")
    return body

