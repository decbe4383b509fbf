"""RecordIO decoding for the Mesos event stream.

Records are ``<decimal length>\\n<payload>`` with no separator; HTTP chunk boundaries are
unrelated to record boundaries, so the decoder buffers across ``feed`` calls.
"""

from __future__ import annotations

#: A length prefix longer than this many digits is garbage, not a record.
MAX_LENGTH_DIGITS = 20


class RecordIOError(ValueError):
    """The stream is not valid RecordIO; the connection must be dropped."""


class RecordIODecoder:
    """Turns arbitrary byte pieces into complete records, keeping any partial tail."""

    def __init__(self, max_record: int = 64 * 2**20) -> None:
        self._buffer = bytearray()
        self._expected: int | None = None
        self.max_record = max_record

    def feed(self, data: bytes) -> list[bytes]:
        """Add bytes; return every record completed by them, in order."""
        self._buffer += data
        records: list[bytes] = []
        while True:
            if self._expected is None:
                newline = self._buffer.find(b"\n")
                if newline < 0:
                    if len(self._buffer) > MAX_LENGTH_DIGITS:
                        raise RecordIOError("record length prefix too long")
                    return records
                prefix = bytes(self._buffer[:newline]).strip()
                if not prefix.isdigit():
                    raise RecordIOError(f"bad record length {prefix[:MAX_LENGTH_DIGITS]!r}")
                length = int(prefix)
                if length > self.max_record:
                    raise RecordIOError(f"record of {length} bytes exceeds {self.max_record}")
                del self._buffer[: newline + 1]
                self._expected = length
            if len(self._buffer) < self._expected:
                return records
            records.append(bytes(self._buffer[: self._expected]))
            del self._buffer[: self._expected]
            self._expected = None

    @property
    def pending(self) -> int:
        """Bytes held back waiting for the rest of a record."""
        return len(self._buffer)


def encode(record: bytes) -> bytes:
    """One record in RecordIO framing (for tests and tools)."""
    return str(len(record)).encode() + b"\n" + record
