"""A protocol-speaking stand-in for the Kubernetes API server's EndpointSlice endpoints.

An aiohttp server on 127.0.0.1 that serves, for discovery.k8s.io/v1 EndpointSlices,

* ``GET /apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices?labelSelector=k=v``:
  a list with ``metadata.resourceVersion`` and ``items``;
* the same with ``watch=1&resourceVersion=N``: a chunked stream of JSON lines, one
  watch event each (ADDED / MODIFIED / DELETED / BOOKMARK / ERROR) as the real server
  sends them: every change after version N, then changes as they happen, until
  ``timeoutSeconds``. A version older than the retained history is answered like the
  real watch cache does: status 200 and one ERROR event carrying a ``Status`` with
  code 410 (or, with ``gone_as_http``, an HTTP 410).

Tests drive it by changing its store (add a pod, mark it not ready, delete it), by
compacting its history to force 410s, and by switching on an outage (every request
answered 500, open watches cut) and off again. It checks the bearer token, so a client
that reaches it has read the kubeconfig that ``write_kubeconfig`` produced: the client
library is exercised unpatched, over real HTTP.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Self

from aiohttp import web

TOKEN = "fake-token-for-tests"
LIST_PATH = "/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices"


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


@dataclasses.dataclass(eq=False)  # hashed by identity: kept in a set
class _Watcher:
    namespace: str
    selector: dict[str, str]
    bookmarks: bool
    queue: asyncio.Queue = dataclasses.field(default_factory=asyncio.Queue)
    transport: asyncio.Transport | None = None  # the connection its stream goes out on


@dataclasses.dataclass
class Endpoint:
    ip: str
    ready: bool | None = True  # None: the condition is left out (means ready)
    pod: str = ""


class FakeKubeApi:
    def __init__(self, token: str = TOKEN) -> None:
        self.token = token
        self.version = 100  # etcd-like global resourceVersion
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}  # (namespace, name) -> EndpointSlice
        self.history: list[tuple[int, str, dict[str, Any]]] = []  # (version, event type, object)
        self.oldest_version = self.version  # watches from before this are answered 410
        self.outage = False
        self.gone_as_http = False
        self.requests: list[tuple[str, dict[str, str]]] = []  # (kind: list|watch, query) seen
        self._watchers: set[_Watcher] = set()
        self._runner: web.AppRunner | None = None
        self.port = 0

    # -- server ----------------------------------------------------------------------------

    async def start(self) -> Self:
        app = web.Application()
        app.router.add_get("/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def close(self) -> None:
        self._cut_watches()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_kubeconfig(self, path: Path, namespace: str = "default") -> Path:
        """A real kubeconfig file pointing at this server, with a token user."""
        path.write_text(
            json.dumps(  # JSON is YAML
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
                    "users": [{"name": "tester", "user": {"token": self.token}}],
                    "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "tester",
                                                              "namespace": namespace}}],
                    "current-context": "fake",
                }
            )
        )
        return path

    @property
    def watch_count(self) -> int:
        return sum(1 for kind, _ in self.requests if kind == "watch")

    @property
    def list_count(self) -> int:
        return sum(1 for kind, _ in self.requests if kind == "list")

    @property
    def open_watches(self) -> int:
        return len(self._watchers)

    # -- store changes (what a test does) ---------------------------------------------------

    def put_slice(self, name: str, service: str, endpoints: list[Endpoint], *, port: int = 50051,
                  port_name: str = "grpc", namespace: str = "default", address_type: str = "IPv4") -> None:
        """Creates or replaces one EndpointSlice of ``service`` (ADDED or MODIFIED)."""
        key = (namespace, name)
        kind = "MODIFIED" if key in self.objects else "ADDED"
        obj = {
            "kind": "EndpointSlice",
            "apiVersion": "discovery.k8s.io/v1",
            "metadata": {"name": name, "namespace": namespace, "labels": {"kubernetes.io/service-name": service},
                         "uid": f"uid-{namespace}-{name}", "generation": 1},
            "addressType": address_type,
            "endpoints": [self._endpoint(e) for e in endpoints],
            "ports": [{"name": port_name, "port": port, "protocol": "TCP"}],
        }
        self._commit(key, kind, obj)

    def set_endpoints(self, name: str, endpoints: list[Endpoint], namespace: str = "default") -> None:
        """Changes one slice's endpoints (a pod added, turned not ready, or gone): MODIFIED."""
        obj = copy.deepcopy(self.objects[(namespace, name)])
        obj["endpoints"] = [self._endpoint(e) for e in endpoints]
        self._commit((namespace, name), "MODIFIED", obj)

    def delete_slice(self, name: str, namespace: str = "default") -> None:
        obj = copy.deepcopy(self.objects[(namespace, name)])
        self._commit((namespace, name), "DELETED", obj)

    def bookmark(self) -> None:
        """Sends a BOOKMARK with the current version to watches that asked for them."""
        event = {"type": "BOOKMARK", "object": {"kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
                                                 "metadata": {"resourceVersion": str(self.version)}}}
        for w in self._watchers:
            if w.bookmarks:
                w.queue.put_nowait(event)

    def compact(self) -> None:
        """Forgets all history: a watch from any version seen so far is now answered 410."""
        self.version += 1  # the compaction itself moves the clock, as etcd's does
        self.history.clear()
        self.oldest_version = self.version

    def expire_watches(self) -> None:
        """Compacts and tells every open watch it is too old (ERROR 410), then ends it."""
        self.compact()
        for w in self._watchers:
            w.queue.put_nowait({"type": "ERROR", "object": _status(
                410, "Expired", "too old resource version: watch was compacted")})
            w.queue.put_nowait(None)

    def drop_watches(self) -> None:
        """Cuts every open watch connection (the server stays up): clients watch again."""
        self._cut_watches()

    def start_outage(self) -> None:
        """Every request answered 500 and every open watch cut mid-stream."""
        self.outage = True
        self._cut_watches()

    def end_outage(self) -> None:
        self.outage = False

    # -- internals --------------------------------------------------------------------------

    @staticmethod
    def _endpoint(e: Endpoint) -> dict[str, Any]:
        out: dict[str, Any] = {"addresses": [e.ip], "conditions": {}}
        if e.ready is not None:
            out["conditions"] = {"ready": e.ready, "serving": e.ready, "terminating": False}
        if e.pod:
            out["targetRef"] = {"kind": "Pod", "name": e.pod, "namespace": "default"}
        return out

    def _commit(self, key: tuple[str, str], kind: str, obj: dict[str, Any]) -> None:
        self.version += 1
        obj["metadata"]["resourceVersion"] = str(self.version)
        if kind == "DELETED":
            self.objects.pop(key, None)
        else:
            self.objects[key] = obj
        snapshot = copy.deepcopy(obj)
        self.history.append((self.version, kind, snapshot))
        for w in self._watchers:
            if self._matches(w.namespace, w.selector, snapshot):
                w.queue.put_nowait({"type": kind, "object": snapshot})

    @staticmethod
    def _matches(namespace: str, selector: dict[str, str], obj: dict[str, Any]) -> bool:
        meta = obj["metadata"]
        labels = meta.get("labels") or {}
        return meta.get("namespace") == namespace and all(labels.get(k) == v for k, v in selector.items())

    def _cut_watches(self) -> None:
        for w in list(self._watchers):
            # Abort the connection mid-chunk, as a crashing server or a dropped load
            # balancer connection would: the client sees an incomplete payload.
            if w.transport is not None:
                w.transport.abort()
            w.queue.put_nowait(None)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        namespace = request.match_info["namespace"]
        query = dict(request.query)
        is_watch = query.get("watch", "").lower() in ("1", "true")
        self.requests.append(("watch" if is_watch else "list", query))
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response(_status(401, "Unauthorized", "Unauthorized"), status=401)
        if self.outage:
            return web.json_response(_status(500, "InternalError", "etcdserver: leader changed"), status=500)
        try:
            selector = dict(part.split("=", 1) for part in query.get("labelSelector", "").split(",") if part)
        except ValueError:
            return web.json_response(_status(400, "BadRequest", "unable to parse requirement"), status=400)
        if not is_watch:
            items = [copy.deepcopy(o) for (ns, _), o in sorted(self.objects.items())
                     if self._matches(namespace, selector, o)]
            return web.json_response({"kind": "EndpointSliceList", "apiVersion": "discovery.k8s.io/v1",
                                      "metadata": {"resourceVersion": str(self.version)}, "items": items})
        return await self._watch(request, namespace, selector, query)

    async def _watch(self, request: web.Request, namespace: str, selector: dict[str, str],
                     query: dict[str, str]) -> web.StreamResponse:
        since = query.get("resourceVersion", "")
        timeout = float(query.get("timeoutSeconds", "1800"))
        watcher = _Watcher(namespace, selector, query.get("allowWatchBookmarks", "").lower() in ("1", "true"))
        # Replay and registration happen with no await in between, so no change can
        # fall between the history read and the live queue.
        if since in ("", "0"):
            for o in self.objects.values():
                if self._matches(namespace, selector, o):
                    watcher.queue.put_nowait({"type": "ADDED", "object": copy.deepcopy(o)})
        elif int(since) < self.oldest_version:
            if self.gone_as_http:
                return web.json_response(_status(410, "Expired", f"too old resource version: {since}"), status=410)
            watcher.queue.put_nowait({"type": "ERROR", "object": _status(
                410, "Expired", f"too old resource version: {since} ({self.oldest_version})")})
            watcher.queue.put_nowait(None)
        else:
            for version, kind, obj in self.history:
                if version > int(since) and self._matches(namespace, selector, obj):
                    watcher.queue.put_nowait({"type": kind, "object": copy.deepcopy(obj)})
        watcher.transport = request.transport  # type: ignore[assignment]
        self._watchers.add(watcher)
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        deadline = time.monotonic() + timeout
        try:
            await response.prepare(request)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    event = await asyncio.wait_for(watcher.queue.get(), remaining)
                except TimeoutError:
                    break  # timeoutSeconds: end the stream cleanly, as the real server does
                if event is None:
                    break
                await response.write(json.dumps(event).encode() + b"\n")
            if not self.outage:
                await response.write_eof()
        except ConnectionResetError:
            pass  # the client went away, or an outage cut the connection
        finally:
            self._watchers.discard(watcher)
        return response
