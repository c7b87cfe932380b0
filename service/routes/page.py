"""GET /: the page for people (static files of the service itself, no CDN, no build step).

The page is a client of the public API like any other: it only calls /predict, /explain and /models.
"""

import re
from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

router = APIRouter(include_in_schema=False)

STATIC = Path(__file__).resolve().parent.parent / "static"
# The browser itself refuses anything that is not from this service (blob: is the preview).
POLICY = (
    "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
# A report is a single static file: its own inline CSS and its plots, no script at all.
REPORT_POLICY = (
    "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)
# On every file we serve: the browser takes the declared type (no sniffing a PNG into
# HTML) and no other site may frame our pages; HTML gets a policy.
FILE_HEADERS = {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY"}


def file_response(path: Path, policy: str = POLICY) -> FileResponse:
    headers = dict(FILE_HEADERS)
    if path.suffix == ".html":
        headers["Content-Security-Policy"] = policy
    return FileResponse(path, headers=headers)


@router.get("/")
async def index() -> FileResponse:
    return file_response(STATIC / "index.html")


@router.get("/static/{name:path}")
async def static(name: str) -> FileResponse:
    # Known kinds of file, no dot-segments: nothing outside service/static can be asked for.
    if not re.fullmatch(r"([\w-]+/)?[\w-]+\.(html|css|js|png|svg)", name):
        raise HTTPException(404, "no such file")
    path = STATIC / name
    if not path.is_file():
        raise HTTPException(404, "no such file")
    return file_response(path)
