"""python -m runtime.cluster --graphs graphs/NAME [--replicas N] [--address auto] [runtime.serve's options]

runtime.serve spread over engine replicas on Ray: one replica per GPU (or a share of the CPUs), each loading the
graphs once and serving many streams exactly as runtime.serve does; one HTTP process in front with runtime.serve's
own API, events, WebSocket and page (its routes, not a copy: only the backend behind them differs).

Modules:
- replica.py: the engine replica (a Ray actor over runtime.serve's `Local` backend), polled for events and writes;
- ingress.py: the HTTP process's backend: where each stream lives, its events and subtitles here, failures;
- main.py: the command line, starting or joining Ray, the replicas, the app.
"""
