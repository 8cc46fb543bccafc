"""`foldercnn serve`: a local web page (upload or webcam) and a REST API for one model file.

The model is loaded once. Uploads are parsed from the request stream into memory and never touch the
disk (Starlette's own form parser would spool files over 1 MB to a temporary file); the size and count
limits are checked while the bytes arrive. Inference runs in a fixed pool of threads; at most
`2 * workers` requests hold an upload in memory at a time, up to `max_waiting` more wait their turn, and
any beyond that get 503 at once, so a burst queues instead of exhausting memory.
"""

import asyncio
import contextlib
import json
import logging
import socket
from concurrent.futures import ThreadPoolExecutor
from importlib.resources import files

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel
from starlette.requests import ClientDisconnect

from .. import runtime
from ..errors import FolderCNNError, OptionError
from ..evaluation.headline import headline
from ..models.explain import explanation_json
from ..models.inference import Classifier
from ..models.load import load
from ..models.onnx_model import NO_EXPLANATIONS, OnnxClassifier
from ..version import __version__
from .teach_routes import LOOPBACK, add_teach_routes
from .uploads import MB, MULTIPART_FILES, Limits, RequestRefused, decode_upload, read_uploads

DEFAULT_MAX_WAITING = 256
log = logging.getLogger("foldercnn.serve")
NO_MODEL = "no model yet: add classes and images in the Teach panel, then train"


class Service:
    """The loaded model, the inference pool and the request bounds of one server."""

    def __init__(self, classifier, limits, workers, max_waiting):
        self.classifier, self.limits, self.workers = classifier, limits, workers
        self.slots = asyncio.Semaphore(2 * workers)  # requests holding an upload: reading, decoding or inferring
        self.max_pending = 2 * workers + max_waiting
        self.pending = 0  # admitted requests (only touched on the event loop, so no lock)
        self.pool = None  # created when the app starts, shut down when it stops

    def classify(self, uploads, classifier, explain=False):
        """Runs in a pool thread: decode every upload, one forward pass for the request, one row per file (with
        explain, where the model looked). The caller reads the model once: a request in flight finishes on the
        model it started with when teaching swaps in a new one."""
        arrays = np.stack([decode_upload(u, classifier.image_size) for u in uploads])
        if not explain:
            return [{"filename": u.filename, **p.to_dict()} for u, p in zip(uploads, classifier.predict_arrays(arrays))]
        predictions, maps = classifier.explain_arrays(arrays)
        return [
            {
                "filename": u.filename,
                **p.to_dict(),
                "explanation": explanation_json(p, None if maps is None else maps[i]),
            }
            for i, (u, p) in enumerate(zip(uploads, predictions))
        ]

    def swap(self, model_path):
        """Load a new model file and serve it from the next request on (one reference assignment: atomic)."""
        self.classifier = load(model_path, threads=1)
        log.info("now serving %s", model_path)

    async def run(self, function, *args):
        """function(*args) in the inference pool."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, function, *args)

    async def predict(self, request):
        if self.pool is None:
            raise RuntimeError("the app has not started: run it under uvicorn, or as `with TestClient(app)`")
        classifier = self.classifier
        if classifier is None:
            raise RequestRefused(409, NO_MODEL)
        explain = explain_flag(request.query_params.get("explain"))
        if explain and not classifier.explains:
            raise RequestRefused(400, NO_EXPLANATIONS)
        if self.pending >= self.max_pending:
            raise RequestRefused(
                503, f"server busy: {self.pending} requests in progress; retry shortly", headers={"Retry-After": "1"}
            )
        self.pending += 1
        try:
            async with self.slots:
                uploads = await read_uploads(request, self.limits)
                results = await self.run(self.classify, uploads, classifier, explain)
            return JSONResponse(results)
        except ClientDisconnect:  # nobody is left to read an answer
            raise RequestRefused(400, "client disconnected") from None
        finally:
            self.pending -= 1


def explain_flag(value):
    """The `explain` query parameter: absent, 0/false: no; 1/true: yes; anything else is refused."""
    if value is None or value.lower() in ("0", "false", ""):
        return False
    if value.lower() in ("1", "true"):
        return True
    raise RequestRefused(400, f"explain must be 0 or 1, got {value[:40]!r}")


class ExplanationOut(BaseModel):
    """Where the model looked (POST /predict?explain=1)."""

    kind: str  # "map": an image model's class activation map; "skeleton": a hands model's 21 landmarks
    method: str | None = None  # for maps: "grad-cam"
    grid: list[list[float]] | None = None  # for maps: 16 rows of 16 values in [0, 1] over the whole image, top first
    points: list[list[float]] | None = None  # for skeletons: 21 [x, y], fractions of the letterboxed square; or null


class PredictionOut(BaseModel):
    """One row of POST /predict's answer (documentation for /docs)."""

    filename: str
    label: str
    probability: float
    probabilities: dict[str, float]
    uncertain: bool
    unfamiliar: bool | None = None  # null: the model file has no unfamiliarity score (older files)
    unfamiliarity: float | None = None  # score / threshold; above 1 means unfamiliar
    explanation: ExplanationOut | None = None  # only with ?explain=1


PREDICT_DOCS = {
    "summary": "Classify one or more images",
    "description": "multipart/form-data with one or more files in the field `files`, e.g. "
    "`curl -F files=@hand.png http://127.0.0.1:8000/predict`. Answers one row per file, in order. "
    "With `?explain=1` each row also has `explanation`: where the model looked, for its predicted class (a 16 x 16 "
    "grid of 0-1 values over the whole image for image models, the 21 hand points for hands models; refused with "
    "400 for an exported .onnx model).",
    "openapi_extra": MULTIPART_FILES,
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


def page_html(limits, teach):
    html = files("foldercnn.deploy").joinpath("static/index.html").read_text(encoding="utf-8")
    return (
        html.replace("__MAX_UPLOAD_MB__", f"{limits.max_file_bytes / MB:g}")
        .replace("__MAX_FILES__", str(limits.max_files))
        .replace("__TEACH__", "on" if teach else "off")
    )


def create_app(
    classifier_or_model_path,
    max_upload_mb=10.0,
    max_files=16,
    workers=None,
    max_waiting=DEFAULT_MAX_WAITING,
    teach=None,
    teach_loopback_only=False,
):
    """The FastAPI app for one model (a Classifier or a model file path). Use it with uvicorn or TestClient;
    the inference pool exists while the app runs (between its startup and shutdown).

    teach: a TeachConfig (deploy/teach.py) adds the Teach panel and the /teach routes; then the model may be None
    (nothing to predict with until the first training job). teach_loopback_only: the /teach routes answer only
    requests addressed to 127.0.0.1, localhost or [::1]."""
    workers = check_limits(max_upload_mb, max_files, workers)
    if classifier_or_model_path is None and teach is None:
        raise FolderCNNError("a model file is needed (or --teach DATA_DIR, to teach one)")
    classifier = (
        classifier_or_model_path
        if classifier_or_model_path is None or isinstance(classifier_or_model_path, (Classifier, OnnxClassifier))
        else load(classifier_or_model_path, threads=1)
    )
    limits = Limits(int(max_upload_mb * MB), int(max_files))
    service = Service(classifier, limits, workers, max_waiting)
    teacher = None
    if teach is not None:
        from .teach import Teacher

        teacher = Teacher(teach, swap=service.swap)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="foldercnn-infer")
        if teacher is not None:
            teacher.begin()
        try:
            yield
        finally:
            if teacher is not None:
                teacher.stop()
            service.pool.shutdown(wait=True, cancel_futures=True)

    app = FastAPI(
        title="foldercnn",
        version=__version__,
        lifespan=lifespan,
        description="Classify images with a foldercnn model file.",
    )
    app.state.service = service
    add_error_handlers(app)
    add_model_routes(app, service, page_html(limits, teach))
    if teacher is not None:
        add_teach_routes(app, service, teacher, teach_loopback_only)
        app.state.teacher = teacher
    return app


def check_limits(max_upload_mb, max_files, workers):
    """The number of inference threads, once the limits are checked."""
    if max_upload_mb is None or max_upload_mb <= 0:
        raise OptionError("max_upload_mb", "must be positive")
    if max_files is None or max_files < 1:
        raise OptionError("max_files", "must be at least 1")
    workers = runtime.physical_cores() if workers is None else workers
    if workers < 1:
        raise OptionError("workers", "must be at least 1")
    return workers


def add_error_handlers(app):
    """Every refusal answers {"detail": ...}: RequestRefused, invalid requests, and unexpected errors (logged)."""

    @app.exception_handler(RequestRefused)
    async def refused(request, exc):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, exc):
        # FastAPI's own answer echoes the input, and a lone surrogate in it cannot be encoded (a 500): ASCII JSON
        errors = [{k: v for k, v in e.items() if k in ("type", "loc", "msg")} for e in exc.errors()]
        return Response(
            json.dumps({"detail": errors}, ensure_ascii=True, default=str),
            status_code=422,
            media_type="application/json",
        )

    @app.exception_handler(Exception)
    async def unexpected_error(request, exc):
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"detail": "internal error"}, status_code=500)


def add_model_routes(app, service, page):
    """The page, /predict, /model and /healthz."""

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return HTMLResponse(page, headers=PAGE_HEADERS)

    @app.post("/predict", **PREDICT_DOCS)
    async def predict(request: Request):
        return await service.predict(request)

    @app.get(
        "/model",
        summary="The model file's metadata: classes, image size, metrics, ..., and `headline`: "
        "the test accuracy from evaluation.json beside the model file, else the "
        "(optimistic) validation accuracy",
    )
    async def model():
        current = service.classifier
        if current is None:
            raise RequestRefused(404, NO_MODEL)
        return {**current.metadata, "headline": headline(current.metadata, current.path), "explains": current.explains}

    @app.get("/healthz", summary="Liveness: 200 while the server runs")
    async def healthz():
        return {"status": "ok", "in_progress": service.pending, "model": service.classifier is not None}


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


def run_server(
    model_path,
    host="127.0.0.1",
    port=8000,
    max_upload_mb=10.0,
    max_files=16,
    workers=None,
    teach=None,
    allow_remote_teach=False,
):
    """`foldercnn serve` (and `foldercnn teach`, model_path None): load the model, then serve until Ctrl-C or
    SIGTERM (graceful shutdown). teach: a TeachConfig for the Teach panel."""
    import uvicorn

    if teach is not None and host not in LOOPBACK and not allow_remote_teach:
        raise FolderCNNError(
            f"teaching writes into {teach.data_dir}: it listens on this computer only "
            f"(--host 127.0.0.1); add --allow-remote-teach to let other machines teach too"
        )
    # a missing or bad file is a FolderCNNError before anything listens; .onnx files run on onnxruntime
    classifier = None if model_path is None else load(model_path, threads=1)
    # many small requests: each inference on one thread, `workers` of them side by side
    torch.set_num_threads(1)
    app = create_app(
        classifier,
        max_upload_mb=max_upload_mb,
        max_files=max_files,
        workers=workers,
        teach=teach,
        teach_loopback_only=not allow_remote_teach,
    )
    sock = listen(host, port)
    bound_port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    what = "no model yet" if classifier is None else f"{model_path} ({', '.join(classifier.classes)})"
    print(f"foldercnn: serving {what} at http://{shown}:{bound_port}/ - API docs at /docs; Ctrl-C stops", flush=True)
    if teach is not None:
        print(
            f"foldercnn: teaching on: captures go to {teach.data_dir}, training runs to {teach.runs_dir} "
            f"(recipe '{teach.recipe}')",
            flush=True,
        )
    if host not in LOOPBACK:
        print("foldercnn: browsers allow the camera only on localhost or https; uploads work everywhere", flush=True)
    service = app.state.service
    # uvicorn's own bound on open connections: a backstop behind the request queue (answers a plain 503)
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
        limit_concurrency=service.max_pending + 256,
    )
    uvicorn.Server(config).run(sockets=[sock])
