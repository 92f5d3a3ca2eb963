"""Async Python client for bild's gRPC service."""

from client.client import BildClient, Mode

__all__ = ["BildClient", "Mode"]
