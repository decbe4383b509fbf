"""RecordIO framing used by the scheduler event stream: `<decimal length>\\n<payload>`.

The encoder is what the master writes; the incremental decoder is for tests and clients,
which must cope with records spanning HTTP chunks and chunks holding several records.
"""

from __future__ import annotations

import json
from typing import Any


def encode(event: dict[str, Any]) -> bytes:
    """One record for an event, JSON-encoded as Mesos does (compact, UTF-8)."""
    payload = json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()
    return str(len(payload)).encode() + b"\n" + payload


class RecordIOError(ValueError):
    """The byte stream is not valid RecordIO."""


class Decoder:
    """Incremental RecordIO decoder: feed arbitrary byte pieces, get whole records."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        records: list[bytes] = []
        while True:
            newline = self._buffer.find(b"\n")
            if newline < 0:
                if len(self._buffer) > 20:
                    raise RecordIOError("record length header too long")
                return records
            header = bytes(self._buffer[:newline])
            if not header.isdigit():
                raise RecordIOError(f"bad record length {header!r}")
            length = int(header)
            end = newline + 1 + length
            if len(self._buffer) < end:
                return records
            records.append(bytes(self._buffer[newline + 1 : end]))
            del self._buffer[:end]

    def feed_json(self, data: bytes) -> list[dict[str, Any]]:
        """Like feed(), decoding each record as a JSON event."""
        return [json.loads(r) for r in self.feed(data)]

    @property
    def pending(self) -> int:
        """Bytes buffered that do not yet form a whole record."""
        return len(self._buffer)
