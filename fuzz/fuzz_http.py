#!/usr/bin/env python3
"""atheris harness: the client's handshake bytes (and the upstream's answer) into a Session.

Input layout (see ``gaia_fuzzlib`` "atheris input formats"): ``[cfg][end][sep] payload``;
the payload is cut into chunks at every ``sep`` byte and fed to ``Session.receive_client``
(or, when cfg selects it, to ``receive_upstream`` as the upstream's handshake answer), then
the session is ended by a client EOF or its timer. Every step is checked by the same code as
tests/fuzz/test_properties.py; an undocumented outcome raises ``InvariantError``, which
atheris reports as a crash.

    mkdir -p /tmp/corpus-http
    python fuzz/fuzz_http.py -max_total_time=180 -dict=fuzz/http.dict /tmp/corpus-http fuzz/corpus/http
"""

import os
import sys

import atheris

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

with atheris.instrument_imports(include=["gaia_gateway", "gaia_fuzzlib", "h11", "wsproto"]):
    import gaia_fuzzlib


def TestOneInput(data: bytes) -> None:
    gaia_fuzzlib.run_http_input(data)


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
