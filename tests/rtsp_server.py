"""An RTSP server on 127.0.0.1 serving an H.264 .mp4 clip in real time, for the live-source tests.

Runs under the system Python with GStreamer's RTSP server (Debian: gir1.2-gst-rtsp-server-1.0, python3-gi,
gstreamer1.0-plugins-good/-bad): `/usr/bin/python3 tests/rtsp_server.py CLIP SECONDS`. Prints the URL once it
listens, and quits by itself after SECONDS.
"""

import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402

Gst.init(None)
clip, lifetime = sys.argv[1], float(sys.argv[2])
server = GstRtspServer.RTSPServer()
server.set_address("127.0.0.1")
server.set_service("0")  # any free port
factory = GstRtspServer.RTSPMediaFactory()
factory.set_launch(f'( filesrc location="{clip}" ! qtdemux ! h264parse '
                   '! rtph264pay name=pay0 pt=96 config-interval=1 )')
factory.set_shared(False)
server.get_mount_points().add_factory("/clip", factory)
server.attach(None)
print(f"rtsp://127.0.0.1:{server.get_bound_port()}/clip", flush=True)
loop = GLib.MainLoop()
GLib.timeout_add(int(lifetime * 1000), loop.quit)
loop.run()
