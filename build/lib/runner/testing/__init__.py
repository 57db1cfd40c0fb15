"""Test and benchmark aids: a scripted model provider, an event loop in a thread."""

from runner.testing.loop_thread import LoopThread
from runner.testing.scripted_provider import RecordedRequest, ScriptedProvider

__all__ = ["LoopThread", "RecordedRequest", "ScriptedProvider"]
