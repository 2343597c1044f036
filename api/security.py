"""Response headers every answer carries (a pure ASGI middleware, so streamed downloads pass
through untouched).

- ``X-Content-Type-Options: nosniff``: browsers must not guess a type from the bytes (an
  artifact or an error body must never be run as a script).
- ``Cache-Control: no-store`` unless a route set its own (artifact downloads revalidate with
  their ETag instead): job states, reports and keys' answers must not sit in shared caches.
- ``X-Frame-Options: DENY`` and ``Referrer-Policy: no-referrer``: nothing here is meant to be
  framed, and URLs holding job ids are not passed on.
- no ``Server`` header (uvicorn's own is switched off where it is started, ``api.cli``).
"""

from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


class SecurityHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in HEADERS.items():
                    headers.setdefault(name, value)
                if "server" in headers:
                    del headers["server"]
            await send(message)

        await self.app(scope, receive, send_with_headers)
