#!/usr/bin/env python3
"""Write the seed corpora (fuzz/corpus/http, fuzz/corpus/frames) and the libFuzzer
dictionaries (fuzz/http.dict, fuzz/frames.dict) from the builders in gaia_fuzzlib.

Deterministic: running it again rewrites the same files (named by content hash). Every seed
is checked to pass the harness before it is written, so a seed corpus never starts with a
crash.

    python fuzz/make_corpus.py [--check]   # --check: only verify the committed files match
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gaia_fuzzlib as fz

HERE = Path(__file__).resolve().parent


def http_seeds() -> list[bytes]:
    out = []
    for i, seed in enumerate(fz.handshake_seeds()):
        variant = (0, 0, 1, 2, 3, 4)[i % 6] if i % 3 == 0 else 0
        out.append(fz.encode_http([seed], variant=variant, end=i % 2))
        # the same bytes in chunks: one per line, and a byte at a time for the first 40
        lines = [x + b"\n" for x in seed.split(b"\n")]
        out.append(fz.encode_http([x for x in lines if x], variant=1 if i % 4 == 0 else 0))
    out.append(fz.encode_http([bytes((b,)) for b in fz.handshake()[:40]] + [fz.handshake()[40:]]))
    for i, answer in enumerate(fz.upstream_answer_seeds()):
        out.append(fz.encode_http([answer], upstream=True, ext=i % 3, end=i % 2))
        if b"\r\n\r\n" in answer:
            head, _, rest = answer.partition(b"\r\n\r\n")
            out.append(fz.encode_http([head, b"\r\n\r\n" + rest], upstream=True, ext=1))
    return out


def frames_seeds() -> list[bytes]:
    out = []
    client = fz.frame_seeds(masked=True)
    server = fz.frame_seeds(masked=False)
    valid_c = fz.build_stream(
        [fz.Msg(1, (b"hello ", b"world"), pings=(0,)), fz.Msg(2, (bytes(300),))], masked=True,
        close=(1000, b"bye"))
    valid_s = fz.build_stream(
        [fz.Msg(1, (b"hi",)), fz.Msg(2, (b"a", b"b", b"c"), pings=(1,))], masked=False)
    deflate_c = fz.build_stream([fz.Msg(1, (b"\xf2\x48\x05\x00",), compressed=True)],
                                masked=True)
    for i, s in enumerate(client + [valid_c, deflate_c]):
        out.append(fz.encode_frames([s], mode=0, variant=i % 2, ext=(0, 1, 2)[i % 3],
                                    end=i % 3))
        out.append(fz.encode_frames([s[:3], s[3:9], s[9:]], mode=1, early=i % 2 == 0,
                                    ext=i % 3))
    for i, s in enumerate(server + [valid_s]):
        out.append(fz.encode_frames([], [s], mode=5, variant=i % 2, ext=i % 3, end=i % 3))
        out.append(fz.encode_frames([], [s[:1], s[1:]], mode=6, early=True))
    ev = fz.EVENT
    mixed = [
        ([valid_c], [valid_s]),
        ([client[0], ev + b"\x00\x20", client[3]], [server[0], ev + b"\x02\x01"]),
        ([client[9]], [server[3], ev + b"\x01\x01", ev + b"\x00\xff"]),
        ([ev + b"\x02\x02", client[0]], [server[1]]),  # shutdown first
        ([client[1][:5]], [ev + b"\x02\x00", server[0]]),  # client EOF mid-frame
    ]
    for i, (c, u) in enumerate(mixed):
        out.append(fz.encode_frames(c, u, mode=9 + i % 5, variant=i % 2, ext=i % 3, end=i % 3))
    for i, s in enumerate(client[:6] + [valid_c]):
        out.append(fz.encode_frames([s[:2], s[2:7], s[7:]], mode=14, variant=i % 2,
                                    ext=i % 3))
    for i, s in enumerate(server[:6] + [valid_s]):
        out.append(fz.encode_frames([], [s[:4], s[4:]], mode=15, variant=i % 2, ext=i % 3))
    return out


def dictionary(tokens: list[bytes]) -> str:
    lines = ["# libFuzzer dictionary written by fuzz/make_corpus.py"]
    for tok in tokens:
        lines.append('"' + "".join(
            chr(b) if 0x20 <= b < 0x7F and b not in (0x22, 0x5C) else f"\\x{b:02x}"
            for b in tok) + '"')
    return "\n".join(lines) + "\n"


HTTP_TOKENS = [t for t in fz.DICTIONARY if len(t) <= 40] + [
    b"GET", b"HEAD", b"HTTP/1.1", b"Host:", b"Upgrade:", b"websocket", b"Connection:",
    b"Sec-WebSocket-Key:", b"Sec-WebSocket-Version:", b"Sec-WebSocket-Accept:", b"101",
    b"permessage-deflate", b"bearer.", b"Bearer ", b"/ws/experience", b"token=",
    b"client_max_window_bits", b"server_no_context_takeover",
]
FRAME_TOKENS = [
    b"\x81", b"\x82", b"\x80", b"\x01", b"\x00", b"\x88", b"\x89", b"\x8a", b"\xc1", b"\x7e",
    b"\x7f", b"\xfe", b"\xff", b"\x03\xe8", b"\x03\xe9", b"\x03\xed", b"\x0f\xa0", b"\xee\xee",
    b"\x00\x00\x00\x00", b"\x7f\xff\xff\xff\xff\xff\xff\xff", fz.MASK,
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="verify, write nothing")
    args = ap.parse_args()
    wanted: dict[Path, bytes] = {}
    for name, seeds, run in (("http", http_seeds(), fz.run_http_input),
                             ("frames", frames_seeds(), fz.run_frames_input)):
        for seed in seeds:
            run(seed)  # a seed must not crash the harness
            digest = hashlib.sha1(seed).hexdigest()
            wanted[HERE / "corpus" / name / digest] = seed
    wanted[HERE / "http.dict"] = dictionary(HTTP_TOKENS).encode()
    wanted[HERE / "frames.dict"] = dictionary(FRAME_TOKENS).encode()
    stale = [p for p, data in wanted.items() if not p.exists() or p.read_bytes() != data]
    if args.check:
        for p in stale:
            print(f"missing or different: {p.relative_to(HERE.parent)}")
        return 1 if stale else 0
    for p in stale:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(wanted[p])
    print(f"{len(wanted)} files, {len(stale)} written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
