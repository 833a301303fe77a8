"""Every bound the core enforces, in one frozen object, with where each default comes from."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Limits"]


@dataclass(frozen=True, slots=True)
class Limits:
    # The KB service and the `websockets` library both default to 1 MiB messages; the old
    # gateway accepted 16 MiB from clients but died on 1 MiB from the backend. One limit, both
    # ways. Breaking it closes the sender with 1009.
    max_message_size: int = 1024 * 1024
    # Request line plus headers. nginx's default large_client_header_buffers is 4 x 8k; a
    # browser's handshake with cookies is 1-4 KB. Over it: 431 (or 414 for the request line).
    max_header_bytes: int = 16 * 1024
    max_headers: int = 100  # like h11/hypercorn's defences against header floods
    # Client bytes that may arrive before the upgrade completes (frames sent early are kept
    # and forwarded after the 101); more than this is a protocol abuse.
    max_early_bytes: int = 64 * 1024
    handshake_timeout: float = 10.0  # first byte to 101, like nginx's client_header_timeout
    connect_timeout: float = 5.0  # upstream TCP + TLS + handshake (the old gateway used 10 s)
    close_timeout: float = 1.0  # waiting for a peer's close reply before dropping it
    idle_timeout: float | None = None  # the KB has none; off unless configured
    send_timeout: float = 30.0  # a peer that reads nothing for this long is dropped
    # Write-buffer high-water mark per socket: above it the gateway stops reading the other
    # side. 64 KiB matches nginx's proxy buffers used in the benchmarks.
    write_buffer_high: int = 64 * 1024
    write_buffer_low: int = 16 * 1024

    def __post_init__(self) -> None:
        for name in ("max_message_size", "max_header_bytes", "max_headers", "max_early_bytes",
                     "write_buffer_high"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        for name in ("handshake_timeout", "connect_timeout", "close_timeout", "send_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.idle_timeout is not None and self.idle_timeout <= 0:
            raise ValueError("idle_timeout must be positive (or unset)")
        if not 0 <= self.write_buffer_low <= self.write_buffer_high:
            raise ValueError("write_buffer_low must be between 0 and write_buffer_high")
