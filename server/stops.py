"""Finds stop strings in streamed text, across token boundaries, without ever emitting text past one.

Text that could be the start of a stop string is held back until the next piece decides it.
"""

from __future__ import annotations


class StopStrings:
    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""

    def push(self, text: str) -> tuple[str, str | None]:
        """Add text; return (text safe to emit, the stop string found or None)."""
        if not self.stops:
            return text, None
        buffer = self._held + text
        found = [(buffer.find(s), s) for s in self.stops if s in buffer]
        if found:
            index, stop = min(found)
            self._held = ""
            return buffer[:index], stop
        hold = max((n for s in self.stops for n in range(1, len(s)) if buffer.endswith(s[:n])), default=0)
        self._held = buffer[len(buffer) - hold :] if hold else ""
        return buffer[: len(buffer) - hold], None

    def flush(self) -> str:
        """At the end of the stream with no stop found: the held-back text was not a stop after all."""
        held, self._held = self._held, ""
        return held
