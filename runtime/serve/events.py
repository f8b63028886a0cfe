"""Following a stream: its events as server-sent events, and the WebSocket that also takes questions and a
browser's webcam frames (push.py)."""

import asyncio
import json
import time

from aiohttp import WSMsgType, web

from .errors import error_event, fail
from .options import MAX_BAD_FRAMES, MAX_PUSH_FPS
from .push import FrameError
from .streams import Stream


class Following:
    """The event routes of the Server (app.py), which this is mixed into: it gives `find`, `_ask`, `args` and
    `closing`."""

    async def follow(self, stream: Stream, first: int, send) -> None:
        """Send every event from id `first` on, as they come, until the stream finishes or the server closes."""
        loop, woken = asyncio.get_running_loop(), asyncio.Event()

        def wake():
            try:
                loop.call_soon_threadsafe(woken.set)
            except RuntimeError:  # the loop has closed
                pass

        unlisten = stream.listen(wake)
        try:
            quiet = 0.0
            while not self.closing:
                woken.clear()
                done = stream.finished  # read before the events, so that the last ones are never missed
                for event in stream.since(first):
                    await send(event)
                    first, quiet = event.id + 1, 0.0
                if done:
                    return
                try:
                    await asyncio.wait_for(woken.wait(), 1.0)
                except TimeoutError:
                    quiet += 1.0
                    if quiet >= 15:  # a comment line keeps proxies from closing a quiet event stream
                        await send(None)
                        quiet = 0.0
        finally:
            unlisten()

    async def events(self, request):
        stream = self.find(request)
        try:
            first = int(request.headers.get("Last-Event-ID", request.query.get("after", -1))) + 1
        except ValueError:
            raise fail(web.HTTPBadRequest, "Last-Event-ID must be an event id") from None
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               "X-Accel-Buffering": "no"})
        await response.prepare(request)

        async def send(event):
            if event is None:
                await response.write(b": keep-alive\n\n")
            else:
                data = json.dumps(event.data, ensure_ascii=False)
                await response.write(f"id: {event.id}\nevent: {event.type}\ndata: {data}\n\n".encode())

        try:
            await self.follow(stream, first, send)
        except ConnectionError:  # the client went away
            pass
        return response

    async def socket(self, request):
        stream = self.find(request)
        offered = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
        ws = web.WebSocketResponse(max_msg_size=self.args.max_frame, heartbeat=20,
                                   protocols=[p for p in offered if p.startswith("bearer.")][:1])
        await ws.prepare(request)

        async def send(event):
            if event is not None:
                await ws.send_json({"type": event.type, "event_id": event.id, **event.data})

        async def follow_then_close():
            await self.follow(stream, 0, send)
            if stream.finished:  # ended, stopped, failed or lost with its replica: its socket closes too
                await ws.close(code=1011 if stream.error else 1000, message=stream.state.encode())

        sender = asyncio.create_task(follow_then_close())
        bad, recent, fed = 0, [], False
        try:
            async for message in ws:
                if message.type == WSMsgType.BINARY:
                    now = time.monotonic()
                    recent = [t for t in recent if now - t < 1.0] + [now]
                    reason = None
                    if stream.pushed is None:
                        reason = "this stream's source is not pushed frames (create it with source 'push')"
                    elif len(recent) > MAX_PUSH_FPS:
                        dropped = "flood"
                    else:
                        try:
                            dropped = None if await stream.push(message.data) else "busy"
                            fed = True
                        except FrameError as error:
                            reason = str(error)
                    if reason is not None:
                        bad += 1
                        await ws.send_json(error_event("invalid_frame", reason))
                        if bad >= MAX_BAD_FRAMES:
                            await ws.close(code=1008, message=b"too many unusable frames")
                            break
                    elif dropped:
                        stream.frames_dropped += 1
                        await ws.send_json({"type": "input_frame.dropped", "reason": dropped,
                                            "frames_dropped": stream.frames_dropped})
                elif message.type == WSMsgType.TEXT:
                    await self._socket_text(stream, ws, message.data)
        finally:
            sender.cancel()
            if fed:  # the client that feeds the stream is gone: the stream ends (a watcher leaving changes nothing)
                stream.end_push()
        return ws

    async def _socket_text(self, stream: Stream, ws, data: str) -> None:
        """A question: {"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content":
        [{"type": "input_text", "text": ...}]}} as in the OpenAI Realtime API, or {"type": "question", "text": ...}."""
        try:
            message = json.loads(data)
            if message.get("type") == "question":
                text = message.get("text")
            elif message.get("type") == "conversation.item.create":
                text = "".join(c.get("text", "") for c in message["item"]["content"] if c.get("type") == "input_text")
            else:
                await ws.send_json(error_event("unknown_event", f"unknown event type {message.get('type')!r}"))
                return
            self._ask(stream, text)
        except web.HTTPException as error:
            await ws.send_json(error_event("invalid_question", json.loads(error.text)["error"]))
        except (ValueError, AttributeError, KeyError, TypeError):
            await ws.send_json(error_event("invalid_event", "a text message is one JSON event"))
