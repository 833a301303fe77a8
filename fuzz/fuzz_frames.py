#!/usr/bin/env python3
"""atheris harness: an OPEN session fed client frames, upstream frames, or both.

Input layout (see ``gaia_fuzzlib`` "atheris input formats"):
``[cfg][end][sep][len:2] client-bytes upstream-bytes``; each side's bytes are cut at every
``sep`` byte. Depending on cfg the session (driven to OPEN through a real handshake and a
simulated upstream 101) gets the client's frames, the upstream's frames, both interleaved
with timers / write blocking / ends / shutdown, or a bare FrameRelay is fed whole and split.
The relayed bytes are checked against an independent RFC 6455 scanner, close codes against
{1002, 1007, 1009}, and the session must reach CLOSED after its ends; an undocumented outcome
raises ``InvariantError``, which atheris reports as a crash.

    mkdir -p /tmp/corpus-frames
    python fuzz/fuzz_frames.py -max_total_time=180 -dict=fuzz/frames.dict /tmp/corpus-frames fuzz/corpus/frames
"""

import os
import sys

import atheris

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

with atheris.instrument_imports(include=["gaia_gateway", "gaia_fuzzlib", "h11", "wsproto"]):
    import gaia_fuzzlib


def TestOneInput(data: bytes) -> None:
    gaia_fuzzlib.run_frames_input(data)


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
