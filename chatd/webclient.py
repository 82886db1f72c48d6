"""The built-in web client (PROTOCOL.md section 2: `GET /` serves it).

Plain HTML, CSS and ES modules from the package folder `chatd/web/`, read once
at start and served from memory: the page at `/`, everything else at
`/static/NAME`. Every response carries a strict Content-Security-Policy (no
inline script or style, no third-party origin; `connect-src 'self'` covers the
same-origin `ws:`/`wss:` socket). File names are not versioned, so browsers
revalidate each load with the ETag and usually get a 304.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib.resources import files
from pathlib import PurePosixPath

from aiohttp import web

from chatd.errors import ChatError

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
       "form-action 'self'")

PAGE = "index.html"

_CONTENT_TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
}


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str
    etag: str


def load_assets() -> dict[str, Asset]:
    """The client's files by name (only the kinds listed in `_CONTENT_TYPES`)."""
    assets = {}
    for entry in (files("chatd") / "web").iterdir():
        content_type = _CONTENT_TYPES.get(PurePosixPath(entry.name).suffix)
        if content_type is not None and entry.is_file():
            body = entry.read_bytes()
            etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
            assets[entry.name] = Asset(body, content_type, etag)
    return assets


def _respond(request: web.Request, asset: Asset) -> web.Response:
    headers = {"Content-Security-Policy": CSP, "Cache-Control": "no-cache", "ETag": asset.etag}
    candidates = {tag.strip().removeprefix("W/")
                  for tag in request.headers.get("If-None-Match", "").split(",")}
    if asset.etag in candidates:
        return web.Response(status=304, headers=headers)
    return web.Response(body=asset.body, content_type=asset.content_type, charset="utf-8",
                        headers=headers)


def add_routes(app: web.Application) -> None:
    assets = load_assets()
    page = assets.pop(PAGE)

    async def index(request: web.Request) -> web.Response:
        return _respond(request, page)

    async def static(request: web.Request) -> web.Response:
        asset = assets.get(request.match_info["name"])
        if asset is None:
            raise ChatError("not_found", "no such file")
        return _respond(request, asset)

    app.router.add_get("/", index)
    app.router.add_get("/static/{name}", static)
