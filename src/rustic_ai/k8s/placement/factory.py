"""Builds the discovery source an EngineSettings asks for (RUSTIC_K8S_DISCOVERY)."""

from __future__ import annotations

from ..base.errors import ConfigError
from ..base.settings import EngineSettings
from ..registry import LocationRegistry
from .discovery import Discovery, RegistryDiscovery, StaticDiscovery


def discovery_from_settings(settings: EngineSettings, registry: LocationRegistry) -> Discovery:
    if settings.discovery == "registry":
        return RegistryDiscovery(registry)
    if settings.discovery == "static":
        return StaticDiscovery(settings.hosts)
    if settings.discovery == "kubernetes":
        # Imported here: the Kubernetes client is only loaded by engines that use it.
        from .kubernetes import KubernetesDiscovery

        return KubernetesDiscovery.from_settings(settings)
    if settings.discovery == "dns":
        from .dns import DnsDiscovery

        return DnsDiscovery.from_settings(settings)
    raise ConfigError(f"RUSTIC_K8S_DISCOVERY={settings.discovery!r}: unknown discovery source")
