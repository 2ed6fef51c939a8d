"""Kubernetes discovery: agent hosts are the ready endpoints of their Service.

Kubernetes already knows which host pods exist and which of them pass their readiness
probe; it publishes that as EndpointSlices (discovery.k8s.io/v1) labelled
``kubernetes.io/service-name=<service>``. This source keeps an in-memory copy of those
slices with the API's list-then-watch pattern:

* list the slices, remember the list's resourceVersion;
* watch from it (with bookmarks, so the version we resume from stays fresh on a quiet
  Service), applying ADDED/MODIFIED/DELETED events to the copy;
* when a watch ends (its timeoutSeconds expired, the connection dropped) watch again
  from the last version seen; when the API says that version is gone (410 Gone, as an
  HTTP status or as an ERROR event) list again;
* on API errors and outages retry with exponential backoff and jitter, and keep
  answering with the last known hosts meanwhile: hosts do not vanish because the
  control plane is briefly away.

A host is addressed by its endpoint address (the pod IP) and the slice's port with the
configured name, never by pod name: pod names do not resolve in cluster DNS. Endpoints
whose ``conditions.ready`` is false (failing readiness, or terminating) are left out;
a missing ``ready`` counts as ready, as the API documents. ``hosts()`` never calls the
API: it answers from memory. ``changed`` (an asyncio.Event, set on every change of the
host set) and the optional ``on_change`` callback let a consumer react at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

import aiohttp
from kubernetes_asyncio import client as k8s_client
from kubernetes_asyncio import config as k8s_config
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config.config_exception import ConfigException

from ..base.errors import ConfigError
from ..base.models import HostRecord
from ..base.settings import EngineSettings

log = logging.getLogger(__name__)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def default_namespace(namespace_file: Path = NAMESPACE_FILE) -> str:
    """The pod's own namespace (mounted with its service account token), else "default"."""
    try:
        return namespace_file.read_text().strip() or "default"
    except OSError:
        return "default"


def join_host_port(host: str, port: int) -> str:
    """host:port, with IPv6 addresses bracketed so the port stays unambiguous."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def addresses_of_slice(endpoint_slice: dict[str, Any], port_name: str) -> dict[str, str]:
    """Ready endpoints of one EndpointSlice (raw API JSON) as {"ip:port": target name}.

    The port is the slice's port named ``port_name`` (or its only port when the name is
    empty). A slice without that port contributes nothing: it lists some other service.
    """
    ports = endpoint_slice.get("ports") or []
    if port_name:
        numbers = [p.get("port") for p in ports if (p.get("name") or "") == port_name]
    else:
        numbers = [p.get("port") for p in ports] if len(ports) == 1 else []
    if not numbers or not numbers[0]:
        return {}
    port = int(numbers[0])
    found: dict[str, str] = {}
    for endpoint in endpoint_slice.get("endpoints") or []:
        conditions = endpoint.get("conditions") or {}
        if conditions.get("ready") is False:  # None (absent) means ready, per the API docs
            continue
        target = (endpoint.get("targetRef") or {}).get("name") or endpoint.get("hostname") or ""
        for address in endpoint.get("addresses") or []:
            found[join_host_port(address, port)] = target
    return found


class _Backoff:
    """Exponential delays with "equal jitter": half fixed, half random, capped.

    The random half keeps a fleet of engines from retrying against a recovering API
    server in lockstep; the fixed half keeps a retry from coming immediately.
    """

    def __init__(self, initial_s: float, max_s: float) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self._attempt = 0

    def next_delay(self) -> float:
        ceiling = min(self.max_s, self.initial_s * (2**self._attempt))
        self._attempt = min(self._attempt + 1, 30)
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    def reset(self) -> None:
        self._attempt = 0


class _Expired(Exception):
    """The resourceVersion we would resume from is gone: list again."""


class _ApiError(Exception):
    """The API answered with an error status, or the stream broke."""


class KubernetesDiscovery:
    """Hosts are the ready endpoints of the agent-host Service, kept current by a watch."""

    def __init__(
        self,
        *,
        namespace: str = "",
        service: str = "rustic-agent-host",
        port_name: str = "grpc",
        kubeconfig: str = "",
        watch_timeout_s: float = 300.0,
        backoff_initial_s: float = 0.25,
        backoff_max_s: float = 5.0,
        start_timeout_s: float = 5.0,
        on_change: Callable[[list[HostRecord]], None] | None = None,
    ) -> None:
        self.namespace = namespace or default_namespace()
        self.service = service
        self.port_name = port_name
        self.kubeconfig = kubeconfig
        self.watch_timeout_s = watch_timeout_s
        self.start_timeout_s = start_timeout_s
        self.on_change = on_change
        self.changed = asyncio.Event()
        self.resource_version: str | None = None  # last version seen; None = list next
        self.lists = 0  # how many times the slices were listed (the first, and each after a 410)
        self._backoff = _Backoff(backoff_initial_s, backoff_max_s)
        self._slices: dict[str, dict[str, str]] = {}  # slice name -> {address: target name}
        self._hosts: dict[str, str] = {}  # merged, what hosts() answers
        self._synced = asyncio.Event()
        self._api: k8s_client.ApiClient | None = None
        self._task: asyncio.Task[None] | None = None
        self._selector = f"{SERVICE_NAME_LABEL}={service}"
        self._gone_in_a_row = 0  # 410s with no watch event in between

    @classmethod
    def from_settings(cls, settings: EngineSettings) -> Self:
        return cls(
            namespace=settings.k8s_namespace,
            service=settings.k8s_service,
            port_name=settings.k8s_port_name,
            kubeconfig=settings.kubeconfig,
            watch_timeout_s=settings.k8s_watch_timeout_s,
            backoff_initial_s=settings.k8s_backoff_initial_s,
            backoff_max_s=settings.k8s_backoff_max_s,
            start_timeout_s=settings.discovery_start_timeout_s,
        )

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Loads the API config, starts the watch, waits (bounded) for the first list.

        An unreachable API is not fatal here: the watch keeps retrying and the engine
        finds no hosts until it answers. A missing or broken config is (ConfigError).
        """
        if self._task is not None:
            return
        configuration = await self._load_configuration()
        self._api = k8s_client.ApiClient(configuration=configuration)
        self._task = asyncio.create_task(
            self._run(), name=f"k8s-discovery-watch:{self.namespace}/{self.service}"
        )
        try:
            async with asyncio.timeout(self.start_timeout_s):
                await self._synced.wait()
        except TimeoutError:
            log.warning(
                "no EndpointSlice list for service %s/%s within %.1f s; starting without hosts, still trying",
                self.namespace, self.service, self.start_timeout_s,
            )

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        api, self._api = self._api, None
        if api is not None:
            await api.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def hosts(self) -> list[HostRecord]:
        return [HostRecord(address=address, name=name) for address, name in sorted(self._hosts.items())]

    @property
    def synced(self) -> bool:
        """True once a list has succeeded (hosts() reflects the cluster, maybe stale)."""
        return self._synced.is_set()

    async def _load_configuration(self) -> k8s_client.Configuration:
        configuration = k8s_client.Configuration()
        try:
            if not self.kubeconfig and os.environ.get("KUBERNETES_SERVICE_HOST"):
                # In a pod: the service account token and CA the kubelet mounts.
                k8s_config.load_incluster_config(client_configuration=configuration)
            else:
                path = self.kubeconfig or os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
                # Reads a small local file once, before any watch runs; the library has
                # no async file API for it.
                await k8s_config.load_kube_config(
                    config_file=path, client_configuration=configuration, persist_config=False
                )
        except (ConfigException, OSError, TypeError, KeyError, ValueError) as exc:
            raise ConfigError(
                f"kubernetes discovery: cannot load the Kubernetes API config ({exc}); run in a pod with a "
                "service account, or set RUSTIC_K8S_KUBECONFIG / KUBECONFIG"
            ) from None
        return configuration

    # -- the watch loop --------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                if self.resource_version is None:
                    await self._list()
                await self._watch()
            except _Expired as exc:
                log.info("watch of %s/%s expired (%s); listing again", self.namespace, self.service, exc)
                self.resource_version = None
                self._gone_in_a_row += 1
                if self._gone_in_a_row > 1:
                    # Gone again with no event since the last list: a confused server.
                    # Back off rather than list and watch in a tight loop.
                    await self._pause("410 Gone again right after a list")
            except (_ApiError, ApiException, aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
                await self._pause(_describe(exc))
            except (KeyError, TypeError, AttributeError) as exc:
                # A response we cannot read is an API problem too; log it in full, once per
                # attempt, rather than let the watch task die and freeze the host list.
                log.exception("unreadable EndpointSlice response for %s/%s", self.namespace, self.service)
                await self._pause(f"unreadable response ({type(exc).__name__})")

    async def _pause(self, why: str) -> None:
        delay = self._backoff.next_delay()
        log.warning(
            "kubernetes API error watching %s/%s: %s; keeping %d known hosts, retrying in %.2f s",
            self.namespace, self.service, why, len(self._hosts), delay,
        )
        await asyncio.sleep(delay)

    async def _list(self) -> None:
        assert self._api is not None
        api = k8s_client.DiscoveryV1Api(self._api)
        response = await api.list_namespaced_endpoint_slice(
            self.namespace,
            label_selector=self._selector,
            _preload_content=False,
            _request_timeout=aiohttp.ClientTimeout(total=30),
        )
        async with response:
            if response.status == 410:
                raise _Expired("list answered 410 Gone")
            if response.status != 200:
                raise _ApiError(f"list answered HTTP {response.status}: {(await response.text())[:200]}")
            body = await response.json(content_type=None)
        slices = {}
        for item in body.get("items") or []:
            slices[item["metadata"]["name"]] = addresses_of_slice(item, self.port_name)
        self._slices = slices
        self.resource_version = str(body["metadata"]["resourceVersion"])
        self.lists += 1
        if not self._gone_in_a_row:  # in a run of 410s the delays keep growing
            self._backoff.reset()
        self._publish()
        self._synced.set()
        log.debug("listed %d slices of %s/%s at version %s", len(slices), self.namespace, self.service,
                  self.resource_version)

    async def _watch(self) -> None:
        """One watch request, from the last version seen, until the server ends it."""
        assert self._api is not None
        api = k8s_client.DiscoveryV1Api(self._api)
        started = time.monotonic()
        response = await api.list_namespaced_endpoint_slice(
            self.namespace,
            label_selector=self._selector,
            watch=True,
            allow_watch_bookmarks=True,
            resource_version=self.resource_version,
            timeout_seconds=int(self.watch_timeout_s),
            _preload_content=False,
            # No total deadline (the server ends the watch at timeoutSeconds); a read
            # silent for much longer than that means the connection is dead.
            _request_timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=self.watch_timeout_s + 30),
        )
        async with response:
            if response.status == 410:
                raise _Expired("watch answered 410 Gone")
            if response.status != 200:
                raise _ApiError(f"watch answered HTTP {response.status}: {(await response.text())[:200]}")
            events = 0
            async for line in response.content:
                if not line.strip():
                    continue
                self._apply(json.loads(line))
                events += 1
                self._backoff.reset()  # the API works again
        if events == 0 and time.monotonic() - started < 1.0:
            # A watch that ends at once without a word is a sick server, not a timeout.
            raise _ApiError("watch ended immediately")

    def _apply(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        obj = event.get("object") or {}
        if kind != "ERROR":
            self._gone_in_a_row = 0
        if kind == "ERROR":
            code = obj.get("code")
            if code == 410:
                raise _Expired(obj.get("message") or "resource version too old")
            raise _ApiError(f"watch ERROR event {code}: {obj.get('message')}")
        metadata = obj.get("metadata") or {}
        version = metadata.get("resourceVersion")
        if kind == "BOOKMARK":
            if version:
                self.resource_version = str(version)
            return
        name = metadata.get("name", "")
        if kind in ("ADDED", "MODIFIED"):
            self._slices[name] = addresses_of_slice(obj, self.port_name)
        elif kind == "DELETED":
            self._slices.pop(name, None)
        else:
            log.debug("ignoring watch event of type %r", kind)
        if version:
            self.resource_version = str(version)
        self._publish()

    def _publish(self) -> None:
        merged: dict[str, str] = {}
        for addresses in self._slices.values():
            merged.update(addresses)  # an endpoint may sit in two slices while they are rebalanced
        if merged == self._hosts:
            return
        added, removed = merged.keys() - self._hosts.keys(), self._hosts.keys() - merged.keys()
        self._hosts = merged
        log.info("agent hosts of %s/%s: %d (added %s, removed %s)", self.namespace, self.service, len(merged),
                 sorted(added) or "-", sorted(removed) or "-")
        self.changed.set()
        if self.on_change is not None:
            try:
                self.on_change([HostRecord(address=a, name=n) for a, n in sorted(merged.items())])
            except Exception:  # a consumer's bug must not stop the watch
                log.exception("discovery on_change callback failed")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ApiException):
        return f"HTTP {exc.status} {exc.reason}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
