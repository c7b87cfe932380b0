"""GET /: the page for people (static files of the service itself, no CDN, no build step).

The page is a client of the public API like any other: it only calls /predict and /models.
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


@router.get("/")
async def index() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": POLICY})


@router.get("/static/{name:path}")
async def static(name: str) -> FileResponse:
    # Known kinds of file, no dot-segments: nothing outside service/static can be asked for.
    if not re.fullmatch(r"([\w-]+/)?[\w-]+\.(html|css|js|png|svg)", name):
        raise HTTPException(404, "no such file")
    path = STATIC / name
    if not path.is_file():
        raise HTTPException(404, "no such file")
    return FileResponse(path)
