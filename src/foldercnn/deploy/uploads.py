"""Image uploads for the server: multipart bodies read from the request stream into memory, every limit checked
as the bytes arrive, and each file checked to be an image by its bytes (never its name or declared type)."""

import asyncio
import contextlib
from dataclasses import dataclass

from fastapi.responses import JSONResponse
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from ..data.images import ImageDecodeError, decode

MB = 1024 * 1024
PART_OVERHEAD = 64 * 1024  # room per part for its boundary and headers in the request-size bound
DRAIN_BYTES = 64 * MB  # after refusing a request, read at most this much more of it (or its own bound) ...
DRAIN_SECONDS = 10  # ... for at most this long, then close the connection
# a request body must arrive at MIN_RATE on average (after GRACE_SECONDS), with no pause over STALL_SECONDS and
# within READ_SECONDS plus its size at MIN_RATE: a client sending a byte every 2 s held an upload slot for ever
# (benchmarks/hostile.py: slow clients)
READ_SECONDS, MIN_RATE, STALL_SECONDS, GRACE_SECONDS = 10.0, 32 * 1024, 5.0, 2.0

# The formats foldercnn reads, recognised by their first bytes: a file's name or declared type is not trusted.
SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"),
    (b"MM\x00+", "TIFF"),
)
SUPPORTED = "PNG, JPEG, WebP, BMP, GIF or TIFF"


def sniff_format(data):
    """The image format named by the data's first bytes, or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((fmt for magic, fmt in SIGNATURES if data.startswith(magic)), None)


class RequestRefused(Exception):
    """A request the server refuses: HTTP status, a reason for people, and the file it concerns. The one error
    type of serve and teach (teach_folder.TeachError is this), answered as {"detail": reason[, "filename"]}."""

    def __init__(self, status, reason, filename=None, headers=None):
        super().__init__(reason)
        self.status, self.reason, self.filename, self.headers = status, reason, filename, headers

    def response(self):
        body = {"detail": self.reason}
        if self.filename is not None:
            body["filename"] = self.filename
        return JSONResponse(body, status_code=self.status, headers=self.headers)


UploadError = RequestRefused

# the OpenAPI request body of every upload route: multipart/form-data, one or more files in the field `files`
MULTIPART_FILES = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["files"],
                    "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                }
            }
        },
    }
}


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
        return {
            "on_part_begin": self._start_part,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
        }

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
            raise UploadError(413, f"too many files: at most {self.limits.max_files} per request", self._filename)

    def on_part_data(self, data, start, end):
        if self._filename is None:
            return
        if len(self._data) + (end - start) > self.limits.max_file_bytes:
            raise UploadError(
                413, f"file too large: at most {self.limits.describe_file_limit()} per file", self._filename
            )
        self._data += data[start:end]

    def on_part_end(self):
        if self._filename is not None and (self._filename or self._data):  # a browser's empty file input: skip
            self.uploads.append(Upload(self._filename, bytes(self._data)))


async def read_uploads(request, limits):
    """The request's files, read from its stream with every limit checked as the bytes arrive."""
    stream = request.stream()
    too_large = UploadError(
        413, f"request too large: at most {limits.max_files} files of {limits.describe_file_limit()} each"
    )
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
        async for chunk in timed(stream, READ_SECONDS + (declared or 0) / MIN_RATE):
            received += len(chunk)
            if received > limits.max_request_bytes:
                raise too_large
            parser.write(chunk)
        parser.finalize()
    except FormParserError:
        await drain(stream, drain_budget)
        raise UploadError(400, "malformed multipart/form-data body") from None
    except UploadError as e:
        if e.status != 408:  # a slow client is not waited for once more
            await drain(stream, drain_budget)  # so that the client, perhaps still sending, gets to read the answer
        raise
    if not form.uploads:
        raise UploadError(400, "no image in the request: send files in the multipart field 'files'")
    return form.uploads


async def timed(stream, seconds):
    """The stream's chunks, or a 408 once the body has arrived slower than MIN_RATE on average (after a grace of
    GRACE_SECONDS), paused over STALL_SECONDS, or taken longer than `seconds` in all: a trickling or stalled
    client gives up its upload slot within seconds."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    iterator, received = stream.__aiter__(), 0
    while True:
        now = loop.time()
        left = min(STALL_SECONDS, start + seconds - now, start + GRACE_SECONDS + received / MIN_RATE - now)
        try:
            if left <= 0:
                raise asyncio.TimeoutError
            chunk = await asyncio.wait_for(iterator.__anext__(), left)
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise UploadError(
                408,
                f"the upload was too slow: at least {MIN_RATE // 1024} KB/s, no pause over "
                f"{STALL_SECONDS:g} s, all of it within {seconds:.0f} s",
            ) from None
        received += len(chunk)
        yield chunk


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
