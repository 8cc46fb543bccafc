"""The REST side of teaching (`/teach/...`), added to serve.py's app when `--teach DATA_DIR` is given.

Every route answers JSON errors `{"detail": ...}`. Teaching writes files, so the routes accept requests only from
the page's own origin (a browser sends `Origin` with every cross-site POST or DELETE: another web site cannot
make the user's browser write into DATA_DIR) and, unless remote teaching is allowed, only when addressed to a
loopback name (a DNS-rebinding page would send its own host name).
"""

from fastapi import Body, Request
from fastapi.responses import FileResponse, JSONResponse

from .teach_folder import MIN_IMAGES_PER_CLASS, TeachError
from .uploads import DRAIN_BYTES, MULTIPART_FILES, decode_upload, drain, read_uploads

LOOPBACK = ("127.0.0.1", "localhost", "::1")  # the names of this computer
CHECK_SIZE = 32  # uploads are decoded once at this size to refuse what is not an image, as /predict does


def host_name(host_header):
    """'127.0.0.1:8000' -> '127.0.0.1', '[::1]:8000' -> '[::1]'."""
    if host_header.startswith("["):
        return host_header.split("]")[0] + "]"
    return host_header.rsplit(":", 1)[0]


def check_request(request, loopback_only):
    host = request.headers.get("host", "")
    if loopback_only and host_name(host).lower().strip("[]") not in LOOPBACK:
        raise TeachError(
            403,
            "teaching answers only requests addressed to this computer (http://127.0.0.1 or "
            "http://localhost); start the server with --allow-remote-teach to teach from elsewhere",
        )
    origin = request.headers.get("origin")
    if origin is not None and origin != f"{request.url.scheme}://{host}":
        raise TeachError(
            403, f"request from another site ({origin}) refused: teaching accepts requests from its own page only"
        )


TEACH_ERRORS = {
    400: {"description": "a bad class name, burst or image"},
    403: {"description": "a request from another site, or to a non-loopback host name"},
    404: {"description": "no such class, capture or job"},
    409: {"description": "exists already, a cap reached, a job running, or not enough images"},
}


IMAGE_UPLOAD_DOCS = dict(
    status_code=201,
    responses={
        **TEACH_ERRORS,
        413: {"description": "a file over the size limit, or too many files in one request"},
        415: {"description": "not an image, or not multipart"},
    },
    summary="Add images to a class: multipart/form-data, field `files`, the same limits as /predict. Frames of one "
    "recording share `burst` (1-24 lower-case letters or digits), which keeps them on one side of the "
    "validation split. Stored as JPEG under server-made names; returns their ids.",
    openapi_extra=MULTIPART_FILES,
)


def add_teach_routes(app, service, teacher, loopback_only):
    """The /teach routes. A refusal anywhere is a TeachError (uploads.RequestRefused), answered by serve.py's
    one handler for it."""
    folder = teacher.folder

    async def guarded(request, work, status=200):
        """Run work() (sync, in the inference pool: it touches the disk) after the request checks; its result
        as JSON with `status`."""
        check_request(request, loopback_only)
        return JSONResponse(await service.run(work), status_code=status)

    def overview():
        estimates = (teacher.estimate or {}).get("classes", {})
        classes = [{**c, "estimate": estimates.get(c["name"])} for c in folder.classes()]
        return {
            "data_dir": str(folder.root),
            "runs_dir": str(teacher.config.runs_dir),
            "recipe": teacher.config.recipe,
            "max_per_class": teacher.config.max_per_class,
            "max_images": teacher.config.max_images,
            "min_per_class": MIN_IMAGES_PER_CLASS,
            "classes": classes,
            "warm": teacher.warm_state(),
        }

    @app.get(
        "/teach/classes",
        summary="The teaching folder's classes, their image counts and captures",
        responses=TEACH_ERRORS,
    )
    async def list_classes(request: Request):
        return await guarded(request, overview)

    @app.post(
        "/teach/classes",
        status_code=201,
        summary="Add a class (an empty sub-folder of the teaching folder)",
        responses=TEACH_ERRORS,
    )
    async def add_class(request: Request, name: str = Body(..., embed=True, max_length=1000)):
        return await guarded(request, lambda: folder.add_class(name), status=201)

    add_capture_routes(app, service, folder, lambda request: check_request(request, loopback_only))
    add_training_routes(app, teacher, guarded)


def add_capture_routes(app, service, folder, check):
    """Add, show and delete the captures of a class."""

    @app.post("/teach/classes/{name}/images", **IMAGE_UPLOAD_DOCS)
    async def add_images(request: Request, name: str, burst: str | None = None):
        try:
            check(request)
            await service.run(folder.check_can_add, name, 1)
        except TeachError:
            await drain(request.stream(), DRAIN_BYTES)  # read what was sent, so the client sees the answer
            raise
        async with service.slots:
            uploads = await read_uploads(request, service.limits)
            await service.run(lambda: [decode_upload(u, CHECK_SIZE) for u in uploads])
            result = await service.run(lambda: folder.save(name, [u.data for u in uploads], burst))
        return JSONResponse(result, status_code=201)

    @app.get(
        "/teach/classes/{name}/images/{image_id}",
        summary="One capture (JPEG)",
        responses=TEACH_ERRORS,
        response_class=FileResponse,
    )
    async def get_image(request: Request, name: str, image_id: str):
        check(request)
        path = await service.run(folder.capture_path, name, image_id)
        return FileResponse(path, media_type="image/jpeg", headers={"Cache-Control": "no-store"})

    @app.delete(
        "/teach/classes/{name}/images/{image_id}",
        summary="Delete one capture (only captures made here)",
        responses=TEACH_ERRORS,
    )
    async def delete_image(request: Request, name: str, image_id: str):
        check(request)
        return JSONResponse(await service.run(lambda: folder.delete(name, image_id)))


def add_training_routes(app, teacher, guarded):
    """Start a training job and follow it."""

    @app.post(
        "/teach/train",
        status_code=202,
        responses=TEACH_ERRORS,
        summary="Train on the teaching folder in the background; the new model is served when it is done. "
        "Answers the job (poll GET /teach/train/{id}); 409 while another job runs",
    )
    async def start_training(request: Request):
        return await guarded(request, lambda: teacher.start().to_dict(), status=202)

    @app.get("/teach/train", summary="The most recent training job, or null", responses=TEACH_ERRORS)
    async def latest_job(request: Request):
        return await guarded(request, lambda: list(teacher.jobs.values())[-1].to_dict() if teacher.jobs else None)

    @app.get(
        "/teach/train/{job_id}",
        responses=TEACH_ERRORS,
        summary="A training job: state (running, done, failed), stage, progress 0-1, seconds, error, and its "
        "result (held-out accuracy on the captures, run folder)",
    )
    async def job_status(request: Request, job_id: str):
        return await guarded(request, lambda: teacher.job(job_id).to_dict())
