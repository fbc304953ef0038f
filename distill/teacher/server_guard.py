"""What stands in front of both servers: who may start them open, who may call them, how much they read.

- `server_key`: the key a server started from the command line requires. Without one it refuses
  to start, unless the operator asked for `--insecure-no-auth`, which is refused on any
  interface other than loopback: an open server is only ever reachable from its own host.
- `bearer_ok`: the constant-time check of an `Authorization: Bearer KEY` header.
- `Guard`: an ASGI middleware for `distill teacher serve` that answers 401 without the key and
  413 past the size limits. A declared `content-length` over the limit is refused before one
  byte of the body is read; a body without one (chunked) is counted as it arrives and refused
  the moment it passes the limit, so no request holds more than the limit in memory.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import os
from typing import Any

from distill.chat import ApiError
from distill.config import ConfigError

logger = logging.getLogger("distill.serve")

UNAUTHORIZED = ApiError(401, "missing or invalid API key", "authentication_error", "invalid_api_key")


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and `localhost`; every other name or address (0.0.0.0 too) is not."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:  # a host name other than localhost may resolve anywhere
        return False


def server_key(env_name: str, insecure_no_auth: bool, host: str, command: str) -> str | None:
    """The key `command` must require, read from `env_name`; None only for an explicit loopback-only open server.

    Raises:
        ConfigError: no key and no `--insecure-no-auth`, or `--insecure-no-auth` with a non-loopback host.
    """
    if insecure_no_auth and not is_loopback(host):
        raise ConfigError(f"{command}: --insecure-no-auth is refused with --host {host}: an unauthenticated "
                          f"server may listen on loopback only (127.0.0.1, ::1, localhost); set {env_name} instead")
    key = os.environ.get(env_name) or None
    if key is not None:
        if insecure_no_auth:
            logger.warning("%s is set: %s requires it; --insecure-no-auth changes nothing", env_name, command)
        return key
    if not insecure_no_auth:
        raise ConfigError(f"{command}: no API key in ${env_name}; set it (clients send it as the Bearer token) or "
                          f"pass --insecure-no-auth to serve without authentication on loopback")
    logger.warning("%s accepts unauthenticated requests on %s (--insecure-no-auth)", command, host)
    return None


def bearer_ok(authorization: str | None, key: str) -> bool:
    scheme, _, token = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


def _header(scope: dict, name: bytes) -> str | None:
    for k, v in scope.get("headers") or ():
        if k.lower() == name:
            return v.decode("latin-1")
    return None


async def send_error(send, e: ApiError) -> None:
    body = json.dumps(e.body()).encode()
    await send({"type": "http.response.start", "status": e.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def too_large(limit: int, what: str = "request body") -> ApiError:
    return ApiError(413, f"{what} exceeds the {limit}-byte limit", code="request_too_large")


class Guard:
    """ASGI middleware: Bearer auth (except `open_paths`) and body-size limits, before the app reads anything.

    Args:
        app: the ASGI app behind it.
        api_key: the key clients must send; None: no authentication.
        max_request_bytes: the most any request body may hold.
        max_upload_bytes: the most a POST to one of `upload_paths` may hold.
        upload_paths: paths whose bodies are uploads (streamed to disk by the route).
        open_paths: paths answered without the key (health probes).
    """

    def __init__(self, app: Any, *, api_key: str | None, max_request_bytes: int, max_upload_bytes: int,
                 upload_paths: tuple[str, ...] = ("/v1/files",), open_paths: tuple[str, ...] = ("/health",)):
        self.app, self.api_key = app, api_key
        self.max_request_bytes, self.max_upload_bytes = max_request_bytes, max_upload_bytes
        self.upload_paths, self.open_paths = upload_paths, open_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if self.api_key and path not in self.open_paths and not bearer_ok(_header(scope, b"authorization"),
                                                                            self.api_key):
            return await send_error(send, UNAUTHORIZED)
        upload = scope.get("method") == "POST" and path in self.upload_paths
        limit = self.max_upload_bytes if upload else self.max_request_bytes
        declared = _header(scope, b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            # Answered before the body is read; the server discards what the client still sends.
            return await send_error(send, too_large(limit, f"request body of {int(declared)} bytes"))
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:  # raised inside the route's read: its error handler answers 413
                    raise too_large(limit)
            return message

        return await self.app(scope, counted, send)
