"""The demo's web app (`opendino demo`): a FastAPI app serving one static page and a small JSON API over `Demo`.

    GET  /                  the page (static/index.html; app.js and style.css under /static/)
    GET  /api/info          backbone, heads, limits, defaults, colour maps, examples
    GET  /examples/FILE     a bundled example photo (only the files listed in examples/examples.json)
    POST /api/analyze       form: image [, threshold]             -> pictures and facts of one image
    POST /api/similarity    form: image, x, y [, other]           -> similarity of one patch over one or two images
    POST /api/match         form: image_a, image_b [, threshold, matches, all_patches] -> the match picture

Uploads are `multipart/form-data`, read into memory up to `max_upload_bytes` (413 beyond; the Content-Length is
checked before reading) and parsed there, so no request writes to disk. Refused input gets a JSON body
`{"error": "..."}` with status 400 (not an image, truncated, too many pixels, bad field) or 413 (too large); any
other failure is a 500 with a JSON error, and the server goes on serving. Model calls run in worker threads
(`Demo` serialises them). The page loads nothing from other hosts, and the Content-Security-Policy sent with every
response forbids it; FastAPI's documentation pages (which load Swagger UI from a CDN) are switched off.
"""

import logging
import math
from typing import Any

from opendino.demo.service import Demo, InputError, Upload, example_path

__all__ = ["CSP", "DEFAULT_MAX_UPLOAD_BYTES", "MissingWebPackagesError", "create_app", "parse_multipart", "serve"]

DEFAULT_MAX_UPLOAD_BYTES = 20 * 2**20
MAX_PARTS = 8  # form fields accepted in one request
CSP = (
    "default-src 'self'; img-src 'self' data: blob:; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
log = logging.getLogger("opendino.demo")


class MissingWebPackagesError(RuntimeError):
    """fastapi, uvicorn or python-multipart is not installed (`opendino demo` prints the message and exits 2)."""

    exit_code = 2


def _require_web() -> None:
    try:
        import fastapi  # noqa: F401
        import python_multipart  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as error:
        raise MissingWebPackagesError(
            f"the demo needs fastapi, uvicorn and python-multipart ({error.name} is missing): "
            "pip install 'opendino[demo]'"
        ) from error


# ------------------------------------------------------------------------------------------------------ forms
def parse_multipart(body: bytes, content_type: str) -> dict[str, Upload]:
    """Parts of a `multipart/form-data` body by field name, each as an `Upload` (file name, or "" for plain fields)."""
    from python_multipart.multipart import MultipartParseError, MultipartParser, parse_options_header

    kind, options = parse_options_header(content_type)
    if kind != b"multipart/form-data" or not options.get(b"boundary"):
        raise InputError("send the image as multipart/form-data (a form with a file field)")
    parts: dict[str, Upload] = {}
    state: dict[str, Any] = {}

    def begin() -> None:
        state.update(headers={}, field=b"", value=b"", data=bytearray())

    def header_field(data: bytes, start: int, end: int) -> None:
        state["field"] += data[start:end]

    def header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def header_end() -> None:
        state["headers"][state["field"].lower()] = state["value"]
        state["field"] = state["value"] = b""

    def part_data(data: bytes, start: int, end: int) -> None:
        state["data"] += data[start:end]

    def end() -> None:
        _, disposition = parse_options_header(state["headers"].get(b"content-disposition", b""))
        name = disposition.get(b"name", b"").decode("utf-8", "replace")
        if not name:
            raise InputError("a form part without a field name")
        if name in parts or len(parts) >= MAX_PARTS:
            raise InputError(f"form field {name!r} repeated, or more than {MAX_PARTS} fields")
        parts[name] = Upload(disposition.get(b"filename", b"").decode("utf-8", "replace"), bytes(state["data"]))

    callbacks = {
        "on_part_begin": begin,
        "on_header_field": header_field,
        "on_header_value": header_value,
        "on_header_end": header_end,
        "on_part_data": part_data,
        "on_part_end": end,
    }
    try:
        parser = MultipartParser(options[b"boundary"], callbacks)  # type: ignore[arg-type]
        parser.write(body)
        parser.finalize()
    except MultipartParseError as e:
        raise InputError(f"malformed multipart/form-data body ({e})") from None
    return parts


def _optional_file(form: dict[str, Upload], name: str) -> Upload | None:
    upload = form.get(name)
    if upload is None or (not upload.data and not upload.name):  # a file input left empty
        return None
    return Upload(upload.name or name, upload.data)


def _file(form: dict[str, Upload], name: str) -> Upload:
    upload = _optional_file(form, name)
    if upload is None:
        raise InputError(f"no {name!r} file in the form")
    return upload


def _number(form: dict[str, Upload], name: str, default: float | None = None) -> float | None:
    field = form.get(name)
    if field is None or not field.data.strip():
        return default
    try:
        value = float(field.data.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise InputError(f"{name}={field.data[:20]!r}: expected a number") from None
    if not math.isfinite(value):
        raise InputError(f"{name}={value}: expected a finite number")
    return value


def _flag(form: dict[str, Upload], name: str) -> bool:
    field = form.get(name)
    return field is not None and field.data.strip().lower() in (b"1", b"true", b"on", b"yes")


# ------------------------------------------------------------------------------------------------------ the app
def create_app(demo: Demo, *, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES):
    """The FastAPI app of the demo page around a loaded `Demo`."""
    _require_web()
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
    from fastapi.staticfiles import StaticFiles
    from starlette.concurrency import run_in_threadpool

    if max_upload_bytes <= 0:
        raise ValueError(f"max_upload_bytes={max_upload_bytes}: must be positive")
    app = FastAPI(title="opendino demo", docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(packages=[("opendino.demo", "static")]), name="static")

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    @app.exception_handler(InputError)
    async def refused(request: Request, error: InputError) -> JSONResponse:
        return JSONResponse({"error": str(error)}, status_code=error.status)

    @app.exception_handler(Exception)
    async def failed(request: Request, error: Exception) -> JSONResponse:
        log.exception("opendino demo: %s failed", request.url.path)
        return JSONResponse({"error": f"internal error: {type(error).__name__}: {error}"}, status_code=500)

    async def read_form(request: Request) -> dict[str, Upload]:
        limit_text = f"{max_upload_bytes / 2**20:.1f} MB"
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > max_upload_bytes:
            raise InputError(f"upload of {int(length) / 2**20:.1f} MB is larger than the limit of {limit_text}", 413)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_upload_bytes:
                raise InputError(f"upload larger than the limit of {limit_text}", 413)
        return parse_multipart(bytes(body), request.headers.get("content-type", ""))

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        from importlib import resources

        return HTMLResponse(resources.files("opendino.demo").joinpath("static", "index.html").read_text("utf-8"))

    @app.get("/api/info")
    async def info() -> JSONResponse:
        facts = demo.info()
        facts["limits"]["max_upload_bytes"] = max_upload_bytes
        return JSONResponse(facts)

    @app.get("/examples/{file}")
    async def example(file: str) -> Response:
        path = example_path(file)
        if path is None:
            return JSONResponse({"error": f"no example named {file!r}"}, status_code=404)
        return FileResponse(path, media_type="image/jpeg")

    @app.post("/api/analyze")
    async def analyze(request: Request) -> JSONResponse:
        form = await read_form(request)
        image = _file(form, "image")
        return JSONResponse(await run_in_threadpool(demo.analyze, image, threshold=_number(form, "threshold")))

    @app.post("/api/similarity")
    async def similarity(request: Request) -> JSONResponse:
        form = await read_form(request)
        image, other = _file(form, "image"), _optional_file(form, "other")
        x, y = _number(form, "x"), _number(form, "y")
        if x is None or y is None:
            raise InputError("give x and y: the clicked pixel of the image")
        return JSONResponse(await run_in_threadpool(demo.similarity, image, x, y, other))

    @app.post("/api/match")
    async def match(request: Request) -> JSONResponse:
        form = await read_form(request)
        a, b = _file(form, "image_a"), _file(form, "image_b")
        top = _number(form, "matches")
        if top is not None and top != int(top):
            raise InputError(f"matches={top}: expected a whole number")
        result = await run_in_threadpool(
            demo.match,
            a,
            b,
            threshold=_number(form, "threshold"),
            top=None if top is None else int(top),
            all_patches=_flag(form, "all_patches"),
        )
        return JSONResponse(result)

    return app


def serve(cfg: Any) -> None:
    """Load the backbone of a `config.DemoConfig` and serve the page until interrupted."""
    _require_web()
    import uvicorn

    demo = Demo.from_config(cfg)
    app = create_app(demo, max_upload_bytes=round(cfg.max_upload_mb * 2**20))
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    print(f"opendino demo: {demo.label} ({demo.info()['device']}) on http://{host}:{cfg.port}/  (Ctrl+C stops it)")
    if cfg.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"opendino demo: listening on {cfg.host}: other machines can reach this page", flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", server_header=False, access_log=False)
