"""The public face of a SuperLink: the Fleet gateway (`fedlora deploy fleet-gateway`), an ASGI app that forwards
Flower's Fleet API, and nothing else, to a SuperLink listening on 127.0.0.1.

Imports neither Flower nor torch (httpx and uvicorn are imported when used).
"""

from __future__ import annotations

import re
import ssl
from pathlib import Path

from ..core.errors import ConfigError, FedloraError

# Flower 1.42's SuperLink serves its Fleet API (SuperNodes), Control API (`flwr` CLI: register node keys, start
# runs, read logs) and Runtime API (its SuperExec) on one host:port, and without account authentication
# (OpenID Connect, a Flower Enterprise feature) the Control API trusts whoever reaches it. So the SuperLink
# listens on 127.0.0.1 only and this gateway is what other machines reach: it forwards Fleet calls and refuses
# every other path, so holding ca.crt lets a party connect a SuperNode (admitted only if its key was
# registered) but not register a key, submit a run or pull a task.
FLEET_PATH = re.compile(r"/v1/fleet/[a-z]+(?:-[a-z]+)*")  # no dots, slashes or escapes: nothing resolves elsewhere
_NOT_FORWARDED = {b"host", b"connection", b"keep-alive", b"proxy-authorization", b"proxy-connection", b"te",
                  b"trailer", b"transfer-encoding", b"upgrade", b"content-length", b"content-encoding"}


class FleetGateway:
    """An ASGI app forwarding Flower's Fleet API, and nothing else, to a SuperLink (HTTPS, checked with ca.crt)."""

    def __init__(self, superlink: str, ca_cert: str | Path, timeout: float = 300.0) -> None:
        self.superlink = superlink
        self.ca_cert = Path(ca_cert)
        self.timeout = timeout
        self.client = None  # made in the server's event loop, at start-up

    async def __call__(self, scope: dict, receive, send) -> None:
        """Serve one ASGI connection: lifespan events, or one HTTP request."""
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._forward(scope, receive, send)

    async def _lifespan(self, receive, send) -> None:
        import httpx

        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                context = ssl.create_default_context(cafile=str(self.ca_cert))
                self.client = httpx.AsyncClient(verify=context, timeout=self.timeout)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _forward(self, scope: dict, receive, send) -> None:
        import httpx

        path = scope["path"]
        if (scope["method"] != "POST" or not FLEET_PATH.fullmatch(path) or scope.get("raw_path", b"") != path.encode()
                or scope.get("query_string")):
            await _reply(send, 403, b"only the Flower Fleet API is served here\n")
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in _NOT_FORWARDED]
        try:
            response = await self.client.post(f"https://{self.superlink}{path}", content=bytes(body), headers=headers)
        except httpx.HTTPError as exc:
            await _reply(send, 502, f"the SuperLink did not answer: {type(exc).__name__}\n".encode())
            return
        await _reply(send, response.status_code, response.content,
                     [(k, v) for k, v in response.headers.raw if k.lower() not in _NOT_FORWARDED])


async def _reply(send, status: int, body: bytes, headers: list | None = None) -> None:
    headers = headers if headers is not None else [(b"content-type", b"text/plain")]
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def split_address(address: str) -> tuple[str, int]:
    """`host:port` (or `[v6]:port`) as (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"address {address!r} is not host:port")
    return host.strip("[]"), int(port)


def serve_fleet_gateway(credentials: str | Path, listen: str, superlink: str) -> None:
    """Serve a FleetGateway on `listen` (HTTPS with the credentials' SuperLink certificate) until stopped."""
    import uvicorn

    root = Path(credentials)
    host, port = split_address(listen)
    split_address(superlink)  # fail here, not on the first SuperNode's call
    for name in ("ca.crt", "superlink.crt", "superlink.key"):
        if not (root / name).is_file():
            raise FedloraError(f"{root / name} not found: pass the directory `fedlora deploy credentials` wrote")
    uvicorn.run(FleetGateway(superlink, root / "ca.crt"), host=host, port=port, lifespan="on", log_level="info",
                ssl_certfile=str(root / "superlink.crt"), ssl_keyfile=str(root / "superlink.key"))


__all__ = ["FLEET_PATH", "FleetGateway", "serve_fleet_gateway", "split_address"]
