"""The endpoint's admission: who may call (the bearer token, Origin and Host: no cross-site or DNS-rebinding use of
a local server), and the body, counted while it streams in and bounded in bytes and time. A body still arriving is
an upload, counted apart from the work slots (`max_in_flight`) and bounded per client address and in all; it must
keep up a minimum rate after a grace period, so a trickle is cut in seconds whatever length it declares. Every
refusal is a typed error whose kind gives the status (`pipeline.errors.HTTP_STATUS`)."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import os
import time
from collections import Counter

from fastapi import Request

from pipeline.errors import BadParameter, Refused, TooLarge

TOKEN_ENV = "PIDRAY_API_TOKEN"
RAW_TYPES = ("image/", "application/octet-stream")  # a raw body must say it is a file; text/plain is refused
LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "[::1]", "::1"}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Admission:
    """The checks every request passes before any work, from the endpoint's arguments (`AppArgs`)."""

    def __init__(self, args):
        self.max_bytes, self.timeout_s, self.body_timeout_s = args.max_bytes, args.timeout_s, args.body_timeout_s
        self.min_rate, self.grace_s = args.body_min_bytes_per_s, args.body_grace_s
        self.max_uploads, self.max_uploads_per_client = args.max_uploads, args.max_uploads_per_client
        self.uploads: Counter = Counter()  # bodies being received, by client address
        self.token = args.token or os.environ.get(TOKEN_ENV) or None
        if args.require_token and not self.token:
            raise RuntimeError(f"require_token is set but no token was given (args or ${TOKEN_ENV}): not starting")
        self.allowed_origins = {o.rstrip("/") for o in args.allowed_origins}
        # Bound to loopback, only loopback names are accepted as Host (DNS rebinding); elsewhere any Host unless listed.
        self.allowed_hosts = set(args.allowed_hosts) | (LOOPBACK_HOSTS if is_loopback(args.bind_host) else set())

    def authorized(self, request: Request) -> bool:
        if not self.token:
            return True
        got = request.headers.get("authorization", "")
        return got.startswith("Bearer ") and hmac.compare_digest(got[7:].encode(), self.token.encode())

    def check_site(self, request: Request) -> None:
        """Refuse cross-site browser requests and, on loopback, Host names that are not ours (DNS rebinding)."""
        host = request.headers.get("host", "")
        if self.allowed_hosts:
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if host not in self.allowed_hosts and name not in self.allowed_hosts:
                raise Refused("forbidden", f"Host {host!r} is not served here (allowed: {sorted(self.allowed_hosts)})")
        origin = request.headers.get("origin")
        if origin is not None:
            own = {f"http://{host}", f"https://{host}"}
            if origin.rstrip("/") not in own | self.allowed_origins:
                raise Refused("forbidden", f"cross-site request from Origin {origin!r} refused; an operator can allow "
                                           "it with allowed_origins")  # fmt: skip

    async def read_body(self, request: Request, limit: int | None = None) -> bytearray:
        """The body, counted while it streams in: over the limit (max_bytes) stops reading at once, whatever the
        header said."""
        limit = limit or self.max_bytes
        length = request.headers.get("content-length")
        if length is None:  # chunked: Serve's proxy would queue the whole body before we could stop reading it
            raise Refused("length_required", "send the body with a Content-Length (chunked uploads are not accepted)")
        if not length.isdigit():
            raise Refused("bad_input", "Content-Length is not a number")
        if int(length) > limit:
            raise TooLarge(f"request body is {int(length):,} bytes, over the limit of {limit:,}")
        body = bytearray()  # one buffer, no join copy
        start, chunks = time.monotonic(), request.stream().__aiter__()
        while True:
            # the body may not fall behind min_rate after the grace period: with n bytes in, the next chunk is due
            # by start + grace + n / rate
            due = start + self.grace_s + len(body) / self.min_rate - time.monotonic()
            try:
                chunk = await asyncio.wait_for(chunks.__anext__(), timeout=max(due, 0.0))
            except StopAsyncIteration:
                return body
            except asyncio.TimeoutError:
                took = time.monotonic() - start
                raise Refused("slow_client", f"the request body arrived slower than {self.min_rate:,} bytes/s "
                              f"(after the first {self.grace_s:g}s): {len(body):,} of {int(length):,} bytes in "
                              f"{took:.1f}s") from None  # fmt: skip
            if len(body) + len(chunk) > limit:
                raise TooLarge(f"request body is over the limit of {limit:,} bytes")
            body += chunk

    async def read_image(self, request: Request, field: str = "image") -> tuple[bytes, dict]:
        ctype = request.headers.get("content-type", "").lower()
        body = await self.read_body(request)
        if not ctype.startswith("multipart/form-data"):
            raw = RAW_TYPES if field == "image" else ("application/octet-stream",)
            if not ctype.startswith(raw):
                what = "image/* or application/octet-stream" if field == "image" else "application/octet-stream"
                raise Refused(
                    "unsupported_media",
                    f"Content-Type {ctype or '(none)'!r}: send the {field} as {what}, or as the multipart field "
                    f"'{field}'",
                )
            return body, {}
        request._body = body  # Starlette parses the form from the bounded body we already hold
        try:
            form = await request.form(max_files=1, max_fields=32)
        except Exception as e:  # malformed multipart: a 400 with our shape, not the framework's
            raise Refused("bad_input", f"malformed multipart body: {e}") from None
        upload = form.get(field)
        if upload is None or isinstance(upload, str):
            raise Refused("bad_input", f"multipart request needs a file field named '{field}'")
        data = await upload.read()
        return data, {k: v for k, v in form.items() if k != field and isinstance(v, str)}

    @property
    def receiving(self) -> int:
        """Bodies being received now, from all clients."""
        return sum(self.uploads.values())

    async def within_body_timeout(self, read, request: Request):
        """The request body (`read`: a coroutine reading it), counted as an upload of its client address while it
        arrives, never as work: past max_uploads_per_client from one address or max_uploads in all, a 503 at once;
        a body that does not arrive within body_timeout_s (or falls behind the minimum rate) is a 408."""
        client = request.client.host if request.client else ""
        if self.uploads[client] >= self.max_uploads_per_client or self.receiving >= self.max_uploads:
            read.close()  # never started: no body is read
            mine = self.uploads[client] >= self.max_uploads_per_client
            raise Refused("busy", f"{self.uploads[client] if mine else self.receiving} uploads "
                                  f"{'from this address ' if mine else ''}are still arriving (the limit is "
                                  f"{self.max_uploads_per_client if mine else self.max_uploads}); retry when they "
                                  "are in")  # fmt: skip
        self.uploads[client] += 1
        try:
            return await asyncio.wait_for(read, timeout=self.body_timeout_s)
        except asyncio.TimeoutError:
            raise Refused("slow_client", f"the request body did not arrive within {self.body_timeout_s:g}s") from None
        finally:
            self.uploads[client] -= 1
            if self.uploads[client] <= 0:
                del self.uploads[client]

    def timeout(self, params: dict) -> float:
        if params.get("timeout") in (None, ""):
            return self.timeout_s
        try:
            t = float(params["timeout"])
        except (TypeError, ValueError):
            raise BadParameter(f"timeout must be a number of seconds, got {params['timeout']!r}") from None
        if not 0 < t <= self.timeout_s:
            raise BadParameter(f"timeout must be in (0, {self.timeout_s:g}] seconds, got {t:g}")
        return t
