"""Baseline: the old gateway design, reproduced for the end-to-end benchmark.

This is how the old Aeonia gaia gateway relayed game traffic: a FastAPI
websocket route that decodes the JWT with PyJWT, accepts the client, opens an
upstream connection with the ``websockets`` client to the same path + query,
and relays both ways with two coroutines under ``asyncio.gather``; served by
uvicorn on uvloop with the ``websockets`` protocol implementation.

    python bench/e2e/old_gateway.py --host 127.0.0.1 --port 8001 \
        --upstream ws://127.0.0.1:9001/ws/experience --jwt-secret S

GET /health returns 200 (readiness probe for the harness).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib

import jwt
import uvicorn
import websockets
from fastapi import FastAPI, WebSocket
from fastapi.responses import PlainTextResponse

UPSTREAM = "ws://127.0.0.1:9001/ws/experience"
JWT_SECRET = "secret"

app = FastAPI()


@app.get("/health")
async def health() -> PlainTextResponse:
    return PlainTextResponse("ok")


@app.websocket("/ws/experience")
async def experience(websocket: WebSocket) -> None:
    token = websocket.query_params.get("token")
    try:
        jwt.decode(token or "", JWT_SECRET, algorithms=["HS256"], audience="authenticated")
    except jwt.PyJWTError:
        await websocket.close(code=1008)
        return
    await websocket.accept()

    query = websocket.url.query
    url = UPSTREAM + ("?" + query if query else "")
    async with websockets.connect(url, max_size=None) as upstream:

        async def client_to_upstream() -> None:
            try:
                while True:
                    msg = await websocket.receive()
                    if msg["type"] == "websocket.disconnect":
                        break
                    if msg.get("bytes") is not None:
                        await upstream.send(msg["bytes"])
                    elif msg.get("text") is not None:
                        await upstream.send(msg["text"])
            finally:
                await upstream.close()

        async def upstream_to_client() -> None:
            try:
                async for msg in upstream:
                    if isinstance(msg, bytes):
                        await websocket.send_bytes(msg)
                    else:
                        await websocket.send_text(msg)
            finally:
                with contextlib.suppress(RuntimeError, OSError):
                    await websocket.close()

        await asyncio.gather(client_to_upstream(), upstream_to_client(), return_exceptions=True)


def main() -> None:
    global UPSTREAM, JWT_SECRET
    ap = argparse.ArgumentParser(description="old FastAPI/websockets gateway (baseline)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8001)
    ap.add_argument("--upstream", default=UPSTREAM)
    ap.add_argument("--jwt-secret", default=JWT_SECRET)
    ap.add_argument("--certfile", help="serve TLS with this certificate chain (PEM)")
    ap.add_argument("--keyfile", help="the private key (PEM) for --certfile")
    args = ap.parse_args()
    UPSTREAM = args.upstream
    JWT_SECRET = args.jwt_secret
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        loop="uvloop",
        ws="websockets",
        log_level="warning",
        backlog=4096,
        ssl_certfile=args.certfile,
        ssl_keyfile=args.keyfile,
    )


if __name__ == "__main__":
    main()
