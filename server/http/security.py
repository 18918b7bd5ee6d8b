"""Exposure to other machines: API keys, the Host header check, and the CLI's start-up checks.

Both checks are pure ASGI middleware: they look at the request's headers and either answer
themselves (401, 400) or hand the untouched `receive` and `send` channels on, so streamed
responses are not buffered and disconnect detection (which reads `receive`) still works."""

from __future__ import annotations

import hashlib
import ipaddress
import re
import secrets
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Receive, Scope, Send

from server.config import ConfigError, Settings
from server.http.errors import error_response

KEY_MESSAGE = "Missing or invalid API key: send 'Authorization: Bearer <key>'."
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")
# A Host header: a bracketed IPv6 literal or a name/IPv4 address, then an optional port.
_HOST_HEADER = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[^:\[\]/@\s]+)(?::[0-9]*)?")


def _digest(key: str | bytes) -> bytes:
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).digest()


def load_api_keys(settings: Settings) -> tuple[str, ...]:
    """The keys of --api-key (comma-separated) and --api-key-file (one a line, '#' comments)."""
    keys = []
    if settings.api_key is not None:
        given = [k.strip() for k in settings.api_key.get_secret_value().split(",")]
        if not any(given):
            raise ConfigError("--api-key (LOGPROBS_API_KEY) holds no key")
        keys += [k for k in given if k]
    if settings.api_key_file:
        path = Path(settings.api_key_file).expanduser()
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ConfigError(f"--api-key-file {path}: cannot read it: {reason}") from None
        found = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
        if not found:
            raise ConfigError(f"--api-key-file {path}: no key in it (one key a line; '#' starts a comment)")
        keys += found
    return tuple(keys)


def is_loopback(host: str) -> bool:
    host = host.strip().strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to any interface


def allowed_hosts(settings: Settings, has_keys: bool) -> tuple[str, ...] | None:
    """Host header values to accept (lower case; '*.domain' wildcards), or None for any."""
    if settings.allowed_hosts is not None:
        hosts = tuple(h.strip().lower() for h in settings.allowed_hosts.split(",") if h.strip())
    elif has_keys:
        return None
    else:
        hosts = LOOPBACK_NAMES
        listen = settings.host.strip().lower()
        try:
            address = ipaddress.ip_address(listen.strip("[]"))
        except ValueError:
            hosts += (listen,) if listen else ()
        else:
            # 0.0.0.0 and :: are no one's name (a browser may send Host: 0.0.0.0 to reach this machine).
            if not address.is_unspecified:
                hosts += (f"[{address}]" if address.version == 6 else str(address),)
    if "*" in hosts:
        return None
    for pattern in hosts:
        if "*" in pattern[1:] or (pattern.startswith("*") and not pattern.startswith("*.")):
            raise ConfigError(f"--allowed-hosts {pattern!r}: a wildcard must be like '*.example.org'")
    if not hosts:
        raise ConfigError("--allowed-hosts (LOGPROBS_ALLOWED_HOSTS) names no host ('*' allows any)")
    return hosts


@dataclass(frozen=True)
class Guard:
    """What the middleware checks, read from the settings once, when the app is created."""

    key_digests: tuple[bytes, ...]  # SHA-256 of each key: compared in constant time, whatever the length
    open_paths: frozenset[str]  # served without a key
    hosts: tuple[str, ...] | None  # None: any Host header

    @classmethod
    def load(cls, settings: Settings) -> Guard:
        keys = load_api_keys(settings)
        open_paths = {"/health"} | ({"/metrics"} if settings.metrics_public else set())
        return cls(tuple(_digest(k) for k in keys), frozenset(open_paths), allowed_hosts(settings, bool(keys)))

    def middleware(self) -> list[Middleware]:
        """The checks as layers, outermost first: the Host check before the key check (a request
        for a wrong host is refused whatever key it carries); none that the settings leave off."""
        layers = []
        if self.hosts is not None:
            layers.append(Middleware(HostMiddleware, hosts=self.hosts))
        if self.key_digests:
            layers.append(Middleware(ApiKeyMiddleware, key_digests=self.key_digests, open_paths=self.open_paths))
        return layers


def _header(scope: Scope, name: bytes) -> list[bytes]:
    return [value for key, value in scope["headers"] if key.lower() == name]


class ApiKeyMiddleware:
    """401 unless the request carries 'Authorization: Bearer KEY' with one of the keys. Every
    failure gets the same answer, so a client learns nothing about which part was wrong."""

    def __init__(self, app: ASGIApp, key_digests: tuple[bytes, ...], open_paths: frozenset[str]):
        self.app, self.key_digests, self.open_paths = app, key_digests, open_paths

    def authorized(self, scope: Scope) -> bool:
        values = _header(scope, b"authorization")
        if len(values) != 1:
            return False
        scheme, _, token = values[0].strip().partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        given = _digest(token.strip())
        matched = False
        for key in self.key_digests:  # no early exit: the time does not say which key matched
            matched |= secrets.compare_digest(given, key)
        return matched

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] in self.open_paths or self.authorized(scope):
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
        else:
            response = error_response(401, KEY_MESSAGE, code="invalid_api_key")
            response.headers["WWW-Authenticate"] = "Bearer"
            await response(scope, receive, send)


class HostMiddleware:
    """400 unless the Host header names an allowed host: a web page that rebinds its own domain
    to this machine's address (DNS rebinding) sends its domain, and reaches nothing, /health included."""

    def __init__(self, app: ASGIApp, hosts: tuple[str, ...]):
        self.app, self.hosts = app, hosts

    def allowed(self, scope: Scope) -> tuple[bool, str]:
        values = _header(scope, b"host")
        if len(values) != 1:
            return False, ""
        value = values[0].decode("latin-1").strip()
        match = _HOST_HEADER.fullmatch(value)
        if not match:
            return False, value
        host = match[1].lower()
        return any(host == p or (p.startswith("*.") and host.endswith(p[1:])) for p in self.hosts), host

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        ok, host = self.allowed(scope)
        if ok:
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
        else:
            message = (
                f"Host {host!r} is not allowed by this server (its operator can allow it with "
                "--allowed-hosts or LOGPROBS_ALLOWED_HOSTS)."
            )
            await error_response(400, message, param="Host", code="invalid_host")(scope, receive, send)


def check_exposure(settings: Settings) -> list[str]:
    """The CLI's checks before it loads the model: keys and hosts readable, TLS files usable, and
    a key whenever it listens on more than loopback. Raises ConfigError; returns warnings."""
    guard = Guard.load(settings)
    if settings.ssl_certfile:

        def no_password() -> NoReturn:  # else OpenSSL would ask on the terminal, and uvicorn ask again
            raise ConfigError(
                f"--ssl-keyfile {settings.ssl_keyfile} is encrypted: give an unencrypted key "
                "(or run uvicorn with its --ssl-keyfile-password)"
            )

        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(
                settings.ssl_certfile, settings.ssl_keyfile, password=no_password
            )
        except OSError as exc:  # ssl.SSLError included
            reason = exc.strerror or str(exc)
            if isinstance(exc, ssl.SSLError):
                reason = "not a PEM certificate (chain) and its private key" + (f": {exc.reason}" if exc.reason else "")
            raise ConfigError(
                f"--ssl-certfile {settings.ssl_certfile} / --ssl-keyfile {settings.ssl_keyfile}: "
                f"cannot use them: {reason}"
            ) from None
    if is_loopback(settings.host):
        return []
    if not guard.key_digests:
        if not settings.allow_no_auth:
            raise ConfigError(
                f"--host {settings.host} serves other machines, and no API key is set, so anyone who reaches "
                "the port could use the server: set a key with --api-key KEY (LOGPROBS_API_KEY) or "
                "--api-key-file FILE, or pass --allow-no-auth to serve without one"
            )
        if guard.hosts is not None:
            return [
                f"no API key, so only requests for the hosts {', '.join(guard.hosts)} are answered "
                "(other machines send this one's name or address: add it with --allowed-hosts)"
            ]
        return []
    if not settings.ssl_certfile:
        return [
            f"--host {settings.host} without TLS: API keys and requests cross the network in clear text "
            "(--ssl-certfile and --ssl-keyfile serve HTTPS)"
        ]
    return []
