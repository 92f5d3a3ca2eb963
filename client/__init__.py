"""Async Python client for bild's gRPC service."""

from client.client import BildClient, Mode, least_loaded

__all__ = ["BildClient", "Mode", "least_loaded"]
