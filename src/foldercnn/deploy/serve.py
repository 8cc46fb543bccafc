"""`foldercnn serve`: a local web page (upload or webcam) and a REST API for one model file.

The model is loaded once. Uploads are parsed from the request stream into memory and never touch the
disk (Starlette's own form parser would spool files over 1 MB to a temporary file); the size and count
limits are checked while the bytes arrive. Inference runs in a fixed pool of threads; at most
`2 * workers` requests hold an upload in memory at a time, up to `max_waiting` more wait their turn, and
any beyond that get 503 at once, so a burst queues instead of exhausting memory.
"""
import asyncio
import contextlib
import logging
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib.resources import files

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from .. import runtime
from ..data.images import ImageDecodeError, decode
from ..errors import FolderCNNError
from ..evaluation.headline import headline
from ..models.inference import Classifier
from .onnx_predict import OnnxClassifier, load_any
from ..version import __version__

MB = 1024 * 1024
DEFAULT_MAX_WAITING = 256
PART_OVERHEAD = 64 * 1024  # room per part for its boundary and headers in the request-size bound
DRAIN_BYTES = 64 * MB  # after refusing a request, read at most this much more of it (or its own bound) ...
DRAIN_SECONDS = 10  # ... for at most this long, then close the connection

log = logging.getLogger("foldercnn.serve")

# The formats foldercnn reads, recognised by their first bytes: a file's name or declared type is not trusted.
SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
    (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"II+\x00", "TIFF"), (b"MM\x00+", "TIFF"),
)
SUPPORTED = "PNG, JPEG, WebP, BMP, GIF or TIFF"


def sniff_format(data):
    """The image format named by the data's first bytes, or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((fmt for magic, fmt in SIGNATURES if data.startswith(magic)), None)


class UploadError(Exception):
    """A request the server refuses: HTTP status, a reason for people, and the file it concerns."""

    def __init__(self, status, reason, filename=None):
        super().__init__(reason)
        self.status, self.reason, self.filename = status, reason, filename

    def response(self):
        body = {"detail": self.reason}
        if self.filename is not None:
            body["filename"] = self.filename
        return JSONResponse(body, status_code=self.status)


@dataclass
class Upload:
    filename: str
    data: bytes


@dataclass
class Limits:
    max_file_bytes: int
    max_files: int

    @property
    def max_request_bytes(self):
        return self.max_files * (self.max_file_bytes + PART_OVERHEAD) + PART_OVERHEAD

    def describe_file_limit(self):
        return f"{self.max_file_bytes / MB:g} MB"


def decode_upload(upload, size):
    """Uploaded bytes -> (size, size, 3) uint8, by the same decode as training and `foldercnn predict`."""
    if not upload.data:
        raise UploadError(400, "empty file", upload.filename)
    fmt = sniff_format(upload.data)
    if fmt is None:
        raise UploadError(415, f"not an image or an unsupported type ({SUPPORTED} expected)", upload.filename)
    try:
        return decode(upload.data, size)
    except ImageDecodeError as e:  # it starts like an image but is corrupt, truncated or too large
        reason = str(e)
        if reason.startswith("not an image"):  # Pillow found no valid header after the signature
            reason = f"corrupt {fmt} image: it starts like one but cannot be read"
        raise UploadError(400, reason, upload.filename) from None


class FormReader:
    """Callbacks for python-multipart's streaming parser: keeps file parts in memory, within the limits."""

    def __init__(self, limits):
        self.limits = limits
        self.uploads = []
        self._start_part()

    def _start_part(self):
        self._field, self._value, self._disposition = b"", b"", b""
        self._filename, self._data = None, bytearray()

    def callbacks(self):
        return {"on_part_begin": self._start_part, "on_header_field": self.on_header_field,
                "on_header_value": self.on_header_value, "on_header_end": self.on_header_end,
                "on_headers_finished": self.on_headers_finished, "on_part_data": self.on_part_data,
                "on_part_end": self.on_part_end}

    def on_header_field(self, data, start, end):
        self._field += data[start:end]

    def on_header_value(self, data, start, end):
        self._value += data[start:end]

    def on_header_end(self):
        if self._field.lower() == b"content-disposition":
            self._disposition = self._value
        self._field, self._value = b"", b""

    def on_headers_finished(self):
        _, options = parse_options_header(self._disposition)
        if b"filename" not in options:
            return  # a plain form field: ignored (its bytes still count towards the request size)
        self._filename = options[b"filename"].decode("utf-8", "replace")
        if len(self.uploads) >= self.limits.max_files:
            raise UploadError(413, f"too many files: at most {self.limits.max_files} per request",
                              self._filename)

    def on_part_data(self, data, start, end):
        if self._filename is None:
            return
        if len(self._data) + (end - start) > self.limits.max_file_bytes:
            raise UploadError(413, f"file too large: at most {self.limits.describe_file_limit()} per file",
                              self._filename)
        self._data += data[start:end]

    def on_part_end(self):
        if self._filename is not None and (self._filename or self._data):  # a browser's empty file input: skip
            self.uploads.append(Upload(self._filename, bytes(self._data)))


async def read_uploads(request, limits):
    """The request's files, read from its stream with every limit checked as the bytes arrive."""
    stream = request.stream()
    too_large = UploadError(413, f"request too large: at most {limits.max_files} files of "
                                 f"{limits.describe_file_limit()} each")
    drain_budget = max(DRAIN_BYTES, limits.max_request_bytes)
    declared = request.headers.get("content-length", "")
    declared = int(declared) if declared.isdigit() else None
    if declared is not None and declared > drain_budget:
        raise too_large  # not worth reading even to drop it: answered unread, then the connection is closed
    try:
        if declared is not None and declared > limits.max_request_bytes:
            raise too_large
        kind, params = parse_options_header(request.headers.get("content-type"))
        if kind != b"multipart/form-data" or not params.get(b"boundary"):
            raise UploadError(415, "send images as multipart/form-data, e.g. curl -F files=@photo.png URL")
        form = FormReader(limits)
        parser = MultipartParser(params[b"boundary"], form.callbacks())
        received = 0
        async for chunk in stream:
            received += len(chunk)
            if received > limits.max_request_bytes:
                raise too_large
            parser.write(chunk)
        parser.finalize()
    except FormParserError:
        await drain(stream, drain_budget)
        raise UploadError(400, "malformed multipart/form-data body") from None
    except UploadError:
        await drain(stream, drain_budget)  # so that the client, perhaps still sending, gets to read the answer
        raise
    if not form.uploads:
        raise UploadError(400, "no image in the request: send files in the multipart field 'files'")
    return form.uploads


async def drain(stream, budget_bytes, budget_seconds=DRAIN_SECONDS):
    """Read and drop what the client still sends (bounded), like a web server's lingering close: closing a
    socket with unread data resets it, and the client would see a broken connection instead of our answer."""
    async def read():
        left = budget_bytes
        async for chunk in stream:
            left -= len(chunk)
            if left < 0:
                break
    with contextlib.suppress(ClientDisconnect, asyncio.TimeoutError):
        await asyncio.wait_for(read(), budget_seconds)


class Service:
    """The loaded model, the inference pool and the request bounds of one server."""

    def __init__(self, classifier, limits, workers, max_waiting):
        self.classifier, self.limits, self.workers = classifier, limits, workers
        self.slots = asyncio.Semaphore(2 * workers)  # requests holding an upload: reading, decoding or inferring
        self.max_pending = 2 * workers + max_waiting
        self.pending = 0  # admitted requests (only touched on the event loop, so no lock)
        self.pool = None  # created when the app starts, shut down when it stops

    def classify(self, uploads):
        """Runs in a pool thread: decode every upload, one forward pass for the request, one row per file."""
        arrays = np.stack([decode_upload(u, self.classifier.image_size) for u in uploads])
        return [{"filename": u.filename, **p.to_dict()} for u, p in zip(uploads, self.classifier.predict_arrays(arrays))]

    async def predict(self, request):
        if self.pool is None:
            raise RuntimeError("the app has not started: run it under uvicorn, or as `with TestClient(app)`")
        if self.pending >= self.max_pending:
            return JSONResponse({"detail": f"server busy: {self.pending} requests in progress; retry shortly"},
                                status_code=503, headers={"Retry-After": "1"})
        self.pending += 1
        try:
            async with self.slots:
                uploads = await read_uploads(request, self.limits)
                results = await asyncio.get_running_loop().run_in_executor(self.pool, self.classify, uploads)
            return JSONResponse(results)
        except UploadError as e:
            return e.response()
        except ClientDisconnect:  # nobody is left to read an answer
            return JSONResponse({"detail": "client disconnected"}, status_code=400)
        finally:
            self.pending -= 1


class PredictionOut(BaseModel):
    """One row of POST /predict's answer (documentation for /docs)."""
    filename: str
    label: str
    probability: float
    probabilities: dict[str, float]
    uncertain: bool
    unfamiliar: bool | None = None  # null: the model file has no unfamiliarity score (older files)
    unfamiliarity: float | None = None  # score / threshold; above 1 means unfamiliar


PREDICT_DOCS = {
    "summary": "Classify one or more images",
    "description": "multipart/form-data with one or more files in the field `files`, e.g. "
                   "`curl -F files=@hand.png http://127.0.0.1:8000/predict`. Answers one row per file, in order.",
    "openapi_extra": {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["files"],
        "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}}}}},
    "response_model": list[PredictionOut],
    "responses": {
        400: {"description": "corrupt or truncated image, too many pixels, empty file, no file, malformed body"},
        413: {"description": "a file over the size limit, or too many files in one request"},
        415: {"description": "not an image or an unsupported type (judged from the bytes), or not multipart"},
        503: {"description": "too many requests waiting; retry after the Retry-After header's seconds"},
    },
}

# The page loads nothing from elsewhere; the policy makes the browser hold it to that.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                               "img-src 'self' blob: data:; media-src 'self' blob:; connect-src 'self'; "
                               "base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def page_html(limits):
    html = files("foldercnn.deploy").joinpath("static/index.html").read_text(encoding="utf-8")
    return (html.replace("__MAX_UPLOAD_MB__", f"{limits.max_file_bytes / MB:g}")
                .replace("__MAX_FILES__", str(limits.max_files)))


def create_app(classifier_or_model_path, max_upload_mb=10.0, max_files=16, workers=None,
               max_waiting=DEFAULT_MAX_WAITING):
    """The FastAPI app for one model (a Classifier or a model file path). Use it with uvicorn or TestClient;
    the inference pool exists while the app runs (between its startup and shutdown)."""
    if max_upload_mb is None or max_upload_mb <= 0:
        raise FolderCNNError("--max-upload-mb must be positive")
    if max_files is None or max_files < 1:
        raise FolderCNNError("--max-files must be at least 1")
    workers = runtime.physical_cores() if workers is None else workers
    if workers < 1:
        raise FolderCNNError("--workers must be at least 1")
    classifier = (classifier_or_model_path if isinstance(classifier_or_model_path, (Classifier, OnnxClassifier))
                  else load_any(classifier_or_model_path, threads=1))
    limits = Limits(int(max_upload_mb * MB), int(max_files))
    service = Service(classifier, limits, workers, max_waiting)
    page = page_html(limits)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="foldercnn-infer")
        try:
            yield
        finally:
            service.pool.shutdown(wait=True, cancel_futures=True)

    app = FastAPI(title="foldercnn", version=__version__, lifespan=lifespan,
                  description="Classify images with a foldercnn model file.")
    app.state.service = service

    @app.exception_handler(Exception)
    async def unexpected_error(request, exc):
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"detail": "internal error"}, status_code=500)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return HTMLResponse(page, headers=PAGE_HEADERS)

    @app.post("/predict", **PREDICT_DOCS)
    async def predict(request: Request):
        return await service.predict(request)

    @app.get("/model", summary="The model file's metadata: classes, image size, metrics, ..., and `headline`: "
                               "the test accuracy from evaluation.json beside the model file, else the "
                               "(optimistic) validation accuracy")
    async def model():
        return {**classifier.metadata, "headline": headline(classifier.metadata, classifier.path)}

    @app.get("/healthz", summary="Liveness: 200 while the server runs")
    async def healthz():
        return {"status": "ok", "in_progress": service.pending}

    return app


def listen(host, port):
    """Bind before starting uvicorn, so that a busy port is a plain error (exit 2), not a traceback."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must say TCP: asyncio turns Nagle's algorithm off only on accepted sockets whose proto is TCP, and
    # with it on, every answer on a kept-alive connection waits ~40 ms for the client's delayed ACK
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise FolderCNNError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def run_server(model_path, host="127.0.0.1", port=8000, max_upload_mb=10.0, max_files=16, workers=None):
    """`foldercnn serve`: load the model, then serve until Ctrl-C or SIGTERM (graceful shutdown)."""
    import uvicorn
    # a missing or bad file is a FolderCNNError before anything listens; .onnx files run on onnxruntime
    classifier = load_any(model_path, threads=1)
    # many small requests: each inference on one thread, `workers` of them side by side
    torch.set_num_threads(1)
    app = create_app(classifier, max_upload_mb=max_upload_mb, max_files=max_files, workers=workers)
    sock = listen(host, port)
    bound_port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    print(f"foldercnn: serving {model_path} ({', '.join(classifier.classes)}) at http://{shown}:{bound_port}/ "
          f"- API docs at /docs; Ctrl-C stops", flush=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print("foldercnn: browsers allow the camera only on localhost or https; uploads work everywhere",
              flush=True)
    service = app.state.service
    # uvicorn's own bound on open connections: a backstop behind the request queue (answers a plain 503)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5,
                            limit_concurrency=service.max_pending + 256)
    uvicorn.Server(config).run(sockets=[sock])
