"""Serving: an OpenAI-compatible chat API with dynamic batching, and a web page (`unillava serve`)."""

from __future__ import annotations

from unillava.serving.app import ServerConfig, ServerThread, capability, create_app

__all__ = ["ServerConfig", "ServerThread", "capability", "create_app"]
