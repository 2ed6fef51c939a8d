"""The only package that imports grpc: generated v1 stubs, the host server adapter and
the engine's client pool. Protobuf types are converted to our models at this edge."""

from .client import ChannelPool, HostClient
from .server import SERVICE_NAME, GrpcHostServer, HostApi

__all__ = ["SERVICE_NAME", "ChannelPool", "GrpcHostServer", "HostApi", "HostClient"]
