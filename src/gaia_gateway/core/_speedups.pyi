# The C module of _speedups.c, for type checkers: FrameRelay's hot fields and feed, and the
# batch walk (_frames.py has the same in Python, with its documentation).
import builtins
from typing import Any

class RelayHead:
    _remaining: int
    _max_message: int
    messages: int
    bytes: int
    _held: Any
    _inject: Any
    _expect_mask: int
    _in_message: bool
    stopped: bool
    def feed(self, data: builtins.bytes, /) -> builtins.bytes: ...

def scan_small(data: bytes, pos: int, lo: int, hi: int, step: int, /) -> tuple[int, int]: ...
