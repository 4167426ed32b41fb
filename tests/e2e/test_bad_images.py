"""Bad inputs get clear errors and hurt nothing.

Three levels:
- `decode_image` on crafted files (parametrised, fast): error type and message, or the RGB image we promise;
- `fetch_input` for data URIs and for files served over HTTP by a local server;
- one real worker process for the module: bad jobs end with the documented error in their result, the
  worker's memory stays bounded through the decompression bombs, and good images still complete after.
"""

from __future__ import annotations

import base64
import io
import json
import random
import struct
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import boto3
import numpy as np
import pytest
import redis
from PIL import Image

from common.adapters.fetch import fetch_input
from common.adapters.netguard import NetPolicy
from common.adapters.queue import make_celery, send_job
from common.adapters.storage import boto_config
from common.domain.errors import JobError
from common.domain.schemas import JobParams, JobSpec
from common.settings import Settings
from common.state.jobs import JobRecord, JobStore
from tests.helpers.servers import LocalServer
from tests.helpers.stack import TEST_VARIANTS, Stack, build_stack, free_database, wait_for
from worker.pipeline.decode import decode_image

pytestmark = pytest.mark.filterwarnings(
    "ignore:Corrupt EXIF data:UserWarning"
)  # Pillow's, for the case below

MAX_PIXELS = 4_000_000  # the limits the module's worker runs with, too
MAX_SIDE = 4096
MAX_BYTES = 2_000_000
ERROR_TYPES = {"file_download_error", "image_load_error", "image_too_large", "image_too_small"}


# --- crafting files --------------------------------------------------------------------------------


def photo(width: int = 64, height: int = 48) -> Image.Image:
    """A small picture with distinct rows and columns (orientation and frame checks can see them)."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def raw_png(width: int, height: int, bit_depth: int, colour_type: int, pixels: bytes) -> bytes:
    """A PNG from raw scanlines (filter byte included), for what Pillow will not write."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(pixels, 9))
        + png_chunk(b"IEND", b"")
    )


def png_bomb(side: int = 20_000) -> bytes:
    """A real bomb: 1-bit 20000x20000 (400 M pixels, 1.2 GB as RGB) of zeros in about 50 KB."""
    row = b"\0" * (1 + (side + 7) // 8)
    return raw_png(side, side, 1, 0, row * side)


def sixteen_bit_rgb_png() -> bytes:
    pixels = np.asarray(photo()).astype(">u2") * 257
    rows = b"".join(b"\0" + pixels[y].tobytes() for y in range(pixels.shape[0]))
    return raw_png(64, 48, 16, 2, rows)


def patched(data: bytes, offset: int, fmt: str, *values: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, *values)
    return bytes(out)


def jpeg_claiming(width: int, height: int) -> bytes:
    data = encode(photo(), "JPEG")
    sof = data.index(b"\xff\xc0")  # SOF0: length(2) precision(1) height(2) width(2)
    return patched(data, sof + 5, ">HH", height, width)


def gif_claiming(width: int, height: int) -> bytes:
    return patched(encode(photo().convert("P"), "GIF"), 6, "<HH", width, height)  # logical screen


def bmp_claiming(width: int, height: int) -> bytes:
    return patched(encode(photo(), "BMP"), 18, "<ii", width, height)


def png_header_claiming(width: int, height: int) -> bytes:
    data = patched(encode(photo(), "PNG"), 16, ">II", width, height)  # IHDR width, height
    return patched(data, 29, ">I", zlib.crc32(data[12:29]))  # and its CRC, so only the size is a lie


def truncated(data: bytes, keep: float = 0.5) -> bytes:
    return data[: int(len(data) * keep)]


def bad_crc_png() -> bytes:
    data = bytearray(encode(photo(), "PNG"))
    data[29] ^= 0xFF  # IHDR's CRC
    return bytes(data)


def exif_rotated_jpeg(orientation: int = 6) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(photo(64, 48), "JPEG", exif=exif.tobytes(), quality=95)


def corrupt_exif_jpeg() -> bytes:
    data = encode(photo(), "JPEG")
    junk = (
        b"Exif\0\0" + b"MM\0\x2a\0\0\0\x08" + b"\xff\xff" + b"\x01" * 40
    )  # 65535 entries promised, none there
    app1 = b"\xff\xe1" + struct.pack(">H", len(junk) + 2) + junk
    return data[:2] + app1 + data[2:]


def animated(fmt: str) -> bytes:
    red, blue = Image.new("RGB", (32, 24), (255, 0, 0)), Image.new("RGB", (32, 24), (0, 0, 255))
    options = {"lossless": True} if fmt == "WEBP" else {}
    return encode(red, fmt, save_all=True, append_images=[blue], duration=100, loop=0, **options)


def palette_with_transparency() -> bytes:
    return encode(photo().convert("P"), "PNG", transparency=0)


def multipage_tiff() -> bytes:
    return encode(
        Image.new("RGB", (32, 24), (255, 0, 0)),
        "TIFF",
        save_all=True,
        append_images=[Image.new("RGB", (32, 24), (0, 0, 255))],
    )


def solid_png(width: int, height: int) -> bytes:
    return encode(Image.new("L", (width, height)), "PNG")


HTML = b"<!doctype html><html><head><title>404</title></head><body>Not found</body></html>"
SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="100000" height="100000"><rect/></svg>'
PDF = b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\nshowpage\n"


def first_pixel_is(colour: tuple[int, int, int]) -> Callable[[Image.Image], bool]:
    return lambda image: all(abs(a - b) <= 8 for a, b in zip(image.getpixel((5, 5)), colour, strict=True))


def is_grey(image: Image.Image) -> bool:
    pixels = np.asarray(image)
    return bool((pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all())


# --- the cases -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[], bytes]
    outcome: str  # "ok" or the JobError type
    fragment: str = ""  # in the error message
    size: tuple[int, int] | None = None  # of the decoded image
    check: Callable[[Image.Image], bool] | None = None


DECODE_CASES = [
    Case("zero-bytes", lambda: b"", "image_load_error", "empty"),
    Case("truncated-jpeg", lambda: truncated(encode(photo(640, 480), "JPEG")), "image_load_error", "JPEG"),
    Case("truncated-png", lambda: truncated(encode(photo(640, 480), "PNG")), "image_load_error", "PNG"),
    Case("png-signature-only", lambda: b"\x89PNG\r\n\x1a\n", "image_load_error", "image"),
    Case("png-bad-crc", bad_crc_png, "image_load_error", "image"),
    Case("html-as-image", lambda: HTML, "image_load_error", "not a supported image"),
    Case("svg", lambda: SVG, "image_load_error", "not a supported image"),
    Case("pdf", lambda: PDF, "image_load_error", "not a supported image"),
    Case("eps-no-ghostscript", lambda: EPS, "image_load_error", "not a supported image"),
    Case(
        "ico-unsupported-format",
        lambda: encode(photo(32, 32), "ICO"),
        "image_load_error",
        "not a supported image",
    ),
    Case(
        "random-bytes", lambda: random.Random(1).randbytes(4096), "image_load_error", "not a supported image"
    ),
    Case("png-bomb-20000x20000", png_bomb, "image_too_large", "declares 400,000,000 pixels"),
    Case(
        "png-header-claims-10000x10000",
        lambda: png_header_claiming(10_000, 10_000),
        "image_too_large",
        "10000x10000 (100,000,000 pixels); the limit is 4,000,000 pixels",
    ),
    Case(
        "png-header-claims-100000x100000",
        lambda: png_header_claiming(100_000, 100_000),
        "image_too_large",
        "too large",
    ),
    Case("jpeg-bomb-65000x65000", lambda: jpeg_claiming(65_000, 65_000), "image_too_large", "too large"),
    Case("gif-bomb-65535x65535", lambda: gif_claiming(65_535, 65_535), "image_too_large", "too large"),
    Case("bmp-bomb-30000x30000", lambda: bmp_claiming(30_000, 30_000), "image_too_large", "too large"),
    Case("width-over-limit", lambda: solid_png(5000, 8), "image_too_large", "neither side may exceed 4096"),
    Case("height-over-limit", lambda: solid_png(8, 5000), "image_too_large", "neither side may exceed 4096"),
    Case("pixels-over-limit", lambda: solid_png(2100, 2100), "image_too_large", "4,410,000 pixels"),
    Case("one-pixel", lambda: solid_png(1, 1), "image_too_small", "1x1"),
    Case("too-thin", lambda: solid_png(7, 300), "image_too_small", "at least 8"),
    Case(
        "16-bit-grey",
        lambda: encode(Image.fromarray(np.asarray(photo().convert("L")).astype(np.uint16) * 257), "PNG"),
        "ok",
        size=(64, 48),
        check=is_grey,
    ),
    Case("16-bit-rgb", sixteen_bit_rgb_png, "ok", size=(64, 48)),
    Case("cmyk-jpeg", lambda: encode(photo().convert("CMYK"), "JPEG"), "ok", size=(64, 48)),
    Case("palette-with-transparency", palette_with_transparency, "ok", size=(64, 48)),
    Case(
        "animated-gif-first-frame",
        lambda: animated("GIF"),
        "ok",
        size=(32, 24),
        check=first_pixel_is((255, 0, 0)),
    ),
    Case(
        "animated-webp-first-frame",
        lambda: animated("WEBP"),
        "ok",
        size=(32, 24),
        check=first_pixel_is((255, 0, 0)),
    ),
    Case("multipage-tiff-first-page", multipage_tiff, "ok", size=(32, 24), check=first_pixel_is((255, 0, 0))),
    Case("exif-rotated", exif_rotated_jpeg, "ok", size=(48, 64)),
    Case("corrupt-exif-ignored", corrupt_exif_jpeg, "ok", size=(64, 48)),
    Case("grayscale-jpeg", lambda: encode(photo().convert("L"), "JPEG"), "ok", size=(64, 48), check=is_grey),
    Case("1-bit", lambda: encode(photo().convert("1"), "PNG"), "ok", size=(64, 48), check=is_grey),
    Case("rgba-alpha-dropped", lambda: encode(photo().convert("RGBA"), "PNG"), "ok", size=(64, 48)),
    Case("smallest-allowed-8x8", lambda: solid_png(8, 8), "ok", size=(8, 8)),
    Case("side-at-limit-4096x8", lambda: solid_png(4096, 8), "ok", size=(4096, 8)),
]


@pytest.mark.parametrize("case", DECODE_CASES, ids=[c.name for c in DECODE_CASES])
def test_decode(case: Case):
    data = case.make()
    if case.outcome == "ok":
        image = decode_image(data, max_pixels=MAX_PIXELS, max_side=MAX_SIDE)
        assert image.mode == "RGB" and image.size == case.size
        assert case.check is None or case.check(image)
        return
    with pytest.raises(JobError) as info:
        decode_image(data, max_pixels=MAX_PIXELS, max_side=MAX_SIDE)
    assert info.value.error_type == case.outcome, info.value.message
    assert case.fragment in info.value.message
    assert info.value.detail()[0]["loc"] == ["body", "image_url"]


def mutations() -> Iterator[tuple[str, bytes]]:
    rng = random.Random(20240601)
    for fmt in ("JPEG", "PNG", "GIF", "WEBP"):
        original = encode(photo(), fmt)
        for index in range(8):
            data = bytearray(original)
            if index % 2:
                for _ in range(6):  # flipped bytes past the signature
                    data[rng.randrange(12, len(data))] ^= 1 << rng.randrange(8)
            else:
                del data[rng.randrange(8, len(data)) :]  # cut anywhere
            yield f"{fmt.lower()}-{index}", bytes(data)


@pytest.mark.parametrize(("name", "data"), list(mutations()), ids=[m[0] for m in mutations()])
def test_damaged_files_decode_or_fail_cleanly(name, data):
    """Whatever the damage: an RGB image or a JobError of a documented type, never another exception."""
    try:
        image = decode_image(data, max_pixels=MAX_PIXELS, max_side=MAX_SIDE)
    except JobError as exc:
        assert exc.error_type in ERROR_TYPES and exc.message
    else:
        assert image.mode == "RGB"


def test_max_side_comes_from_the_setting(monkeypatch):
    monkeypatch.setenv("BIREFNET_MAX_INPUT_SIDE", "100")
    with pytest.raises(JobError, match="neither side may exceed 100"):
        decode_image(solid_png(200, 8), max_pixels=MAX_PIXELS, max_side=Settings().max_input_side)


# --- data URIs and HTTP-served files ---------------------------------------------------------------

PNG_BYTES = encode(photo(), "PNG")
B64 = base64.b64encode(PNG_BYTES).decode()
DATA_CASES = [
    ("data-no-comma", "data:image/png;base64" + B64, "file_download_error", "malformed data URI"),
    ("data-bad-mime", "data:image png;base64," + B64, "file_download_error", "malformed data URI"),
    ("data-invalid-base64", "data:image/png;base64,****" + B64, "file_download_error", "invalid base64"),
    ("data-non-ascii-base64", "data:image/png;base64,ü" + B64, "file_download_error", "invalid base64"),
    ("data-empty", "data:image/png;base64,", "file_download_error", "empty"),
    (
        "data-oversized-base64",
        "data:image/png;base64," + "A" * (MAX_BYTES * 4 // 3 + 100),
        "image_too_large",
        f"limit of {MAX_BYTES} bytes",
    ),
    (
        "data-oversized-plain",
        "data:image/png," + "A" * (MAX_BYTES + 10),
        "image_too_large",
        f"{MAX_BYTES} bytes",
    ),
    (
        "data-html-payload",
        "data:text/html,<script>alert(1)</script>",
        "image_load_error",
        "not a supported image",
    ),
    (
        "data-line-wrapped-base64",
        "data:image/png;base64," + "\n".join(B64[i : i + 76] for i in range(0, len(B64), 76)),
        "ok",
        "",
    ),
    ("data-unpadded-base64", "data:image/png;base64," + B64.rstrip("="), "ok", ""),
    ("data-percent-encoded", "data:image/png," + quote(PNG_BYTES), "ok", ""),
    ("data-wrong-mime", "data:text/plain;base64," + B64, "ok", ""),
    ("data-uppercase-scheme", "DATA:image/png;BASE64," + B64, "ok", ""),
]


@pytest.mark.parametrize(("name", "url", "outcome", "fragment"), DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_data_uri(name, url, outcome, fragment):
    def run() -> Image.Image:
        data = fetch_input(
            url,
            objects=None,
            max_bytes=MAX_BYTES,
            timeout=5,  # type: ignore[arg-type]
            policy=NetPolicy.from_settings(Settings()),
        )
        return decode_image(data, max_pixels=MAX_PIXELS, max_side=MAX_SIDE)

    if outcome == "ok":
        assert run().size == (64, 48)
        return
    with pytest.raises(JobError) as info:
        run()
    assert info.value.error_type == outcome and fragment in info.value.message, info.value.message


@pytest.fixture(scope="module")
def image_server() -> Iterator[LocalServer]:
    server = LocalServer("127.0.0.1").start()
    server.files.update(
        {
            "/photo.jpg": (HTML, "image/jpeg"),  # an error page served as an image
            "/zero.png": (b"", "image/png"),
            "/photo.png": (encode(photo(), "JPEG"), "image/png"),  # JPEG named and typed as PNG
            "/bomb.png": (png_bomb(), "image/png"),
        }
    )
    yield server
    server.stop()


@pytest.mark.parametrize(
    ("path", "outcome", "fragment"),
    [
        ("/photo.jpg", "image_load_error", "not a supported image"),
        ("/zero.png", "file_download_error", "empty (0 bytes)"),
        ("/photo.png", "ok", ""),
        ("/bomb.png", "image_too_large", "400,000,000 pixels"),
        ("/truncated", "file_download_error", "incomplete"),
    ],
)
def test_http_served(image_server, path, outcome, fragment):
    policy = NetPolicy.from_settings(
        Settings(fetch_allow_networks=("127.0.0.1/32",), fetch_allowed_ports="*")
    )
    try:
        data = fetch_input(
            image_server.url(path),
            objects=None,
            max_bytes=MAX_BYTES,
            timeout=5,  # type: ignore[arg-type]
            policy=policy,
        )
        image = decode_image(data, max_pixels=MAX_PIXELS, max_side=MAX_SIDE)
    except JobError as exc:
        assert exc.error_type == outcome and fragment in exc.message, exc.message
    else:
        assert outcome == "ok" and image.size == (64, 48)


# --- through a real worker -------------------------------------------------------------------------


@dataclass
class WorkerHarness:
    stack: Stack
    settings: Settings
    store: JobStore
    s3: object
    pid: int

    def put(self, key: str, data: bytes) -> str:
        self.s3.put_object(Bucket=self.settings.input_bucket, Key=key, Body=data)  # type: ignore[attr-defined]
        return f"s3://{self.settings.input_bucket}/{key}"

    def submit(self, image_url: str) -> str:
        request_id = uuid.uuid4().hex
        spec = JobSpec(
            request_id=request_id,
            variant="general-light",
            image_url=image_url,
            params=JobParams(output_format="png"),
            source="api",
            owner="bad-images",
            output_prefix=f"{self.settings.output_prefix}requests/{request_id}/",
        )
        assert self.store.create(spec)
        send_job(make_celery(self.settings), spec)
        return request_id

    def wait(self, request_ids: list[str], timeout: float) -> dict[str, JobRecord]:
        def done() -> bool:
            return all(self.store.status(r) == "COMPLETED" for r in request_ids)

        wait_for(
            done, timeout, f"{len(request_ids)} jobs to complete\n{self.stack.tail('worker')}", interval=0.2
        )
        return {r: self.store.get(r) for r in request_ids}  # type: ignore[misc]

    def memory_kb(self) -> dict[str, int]:
        fields = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0])
        return fields

    def reset_peak(self) -> None:
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)


@pytest.fixture(scope="module")
def worker(redis_server, moto_endpoint, tmp_path_factory) -> Iterator[WorkerHarness]:
    """One worker for the module, with the same limits as the decode cases and the production network
    policy (no allow-list): everything but the model is as deployed."""
    suffix = uuid.uuid4().hex[:8]
    redis_url = f"redis://127.0.0.1:{redis_server.port}/{free_database(redis_server.port)}"
    redis.Redis.from_url(redis_url).flushdb()
    log_dir = tmp_path_factory.mktemp("bad-images")
    stack = build_stack(
        redis_url,
        moto_endpoint,
        {
            "BIREFNET_INPUT_BUCKET": f"in-{suffix}",
            "BIREFNET_OUTPUT_BUCKET": f"out-{suffix}",
            "BIREFNET_VARIANT_OVERRIDES": json.dumps(TEST_VARIANTS),
            "BIREFNET_WEIGHTS_FALLBACK": "none",
            "BIREFNET_TORCH_THREADS": "1",
            "BIREFNET_MAX_INPUT_PIXELS": str(MAX_PIXELS),
            "BIREFNET_MAX_INPUT_SIDE": str(MAX_SIDE),
            "BIREFNET_MAX_INPUT_BYTES": str(MAX_BYTES),
            "BIREFNET_HTTP_TIMEOUT": "5",
            "BIREFNET_TEST_LOG_DIR": str(log_dir),
        },
        queue_name=f"events-{suffix}",
    )
    settings = stack.settings
    s3 = boto3.client(
        "s3", region_name=settings.aws_region, endpoint_url=settings.s3_endpoint_url, config=boto_config()
    )
    proc = stack.start_worker("general-light", name="worker")
    try:
        yield WorkerHarness(stack, settings, JobStore.from_url(redis_url), s3, proc.pid)
    finally:
        stack.stop_all()


# (name, how the input arrives, expected error type, message fragment)
WORKER_BAD_CASES: list[tuple[str, Callable[[WorkerHarness], str], str, str]] = [
    ("html-named-jpg", lambda w: w.put("bad/page.jpg", HTML), "image_load_error", "not a supported image"),
    ("zero-byte-object", lambda w: w.put("bad/empty.png", b""), "file_download_error", "empty (0 bytes)"),
    (
        "truncated-jpeg",
        lambda w: w.put("bad/half.jpg", truncated(encode(photo(640, 480), "JPEG"))),
        "image_load_error",
        "truncated",
    ),
    ("png-bomb", lambda w: w.put("bad/bomb.png", png_bomb()), "image_too_large", "400,000,000 pixels"),
    (
        "jpeg-bomb",
        lambda w: w.put("bad/bomb.jpg", jpeg_claiming(65_000, 65_000)),
        "image_too_large",
        "too large",
    ),
    (
        "gif-bomb",
        lambda w: w.put("bad/bomb.gif", gif_claiming(65_535, 65_535)),
        "image_too_large",
        "too large",
    ),
    (
        "bmp-bomb",
        lambda w: w.put("bad/bomb.bmp", bmp_claiming(30_000, 30_000)),
        "image_too_large",
        "too large",
    ),
    (
        "width-over-limit",
        lambda w: w.put("bad/wide.png", solid_png(5000, 8)),
        "image_too_large",
        "neither side may exceed 4096",
    ),
    ("pixels-over-limit", lambda w: w.put("bad/big.png", solid_png(2100, 2100)), "image_too_large", "pixels"),
    (
        "object-over-byte-limit",
        lambda w: w.put("bad/huge.bin", b"\0" * (MAX_BYTES + 1)),
        "image_too_large",
        f"the limit is {MAX_BYTES} bytes",
    ),
    (
        "one-pixel-data-uri",
        lambda w: "data:image/png;base64," + base64.b64encode(solid_png(1, 1)).decode(),
        "image_too_small",
        "1x1",
    ),
    (
        "malformed-data-uri",
        lambda w: "data:image/png;base64;" + B64,
        "file_download_error",
        "malformed data URI",
    ),
    (
        "oversized-base64",
        lambda w: "data:image/png;base64," + "A" * (MAX_BYTES * 4 // 3 + 100),
        "image_too_large",
        "exceeds the limit",
    ),
    (
        "missing-object",
        lambda w: f"s3://{w.settings.input_bucket}/bad/nothing-here.png",
        "file_download_error",
        "NoSuchKey",
    ),
    (
        "ssrf-metadata",
        lambda w: "http://169.254.169.254/latest/meta-data/",
        "file_download_error",
        "cloud metadata",
    ),
    ("ssrf-localhost", lambda w: "http://localhost/admin", "file_download_error", "loopback"),
    (
        "ssrf-odd-port",
        lambda w: "http://93.184.216.34:6379/",
        "file_download_error",
        "port 6379 is not allowed",
    ),
]

# Good inputs after the bad ones: the worker keeps serving, with the promised conversions.
WORKER_GOOD_CASES: list[tuple[str, Callable[[WorkerHarness], str], tuple[int, int]]] = [
    ("exif-rotated-cmyk-named-png", lambda w: w.put("good/rotated.png", _rotated_cmyk()), (48, 64)),
    ("animated-gif", lambda w: w.put("good/anim.gif", animated("GIF")), (32, 24)),
]


def _rotated_cmyk() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(photo(64, 48).convert("CMYK"), "JPEG", exif=exif.tobytes())


# Peak RSS growth allowed while the bad jobs run. Bounded inputs need far less: a download is at most
# MAX_BYTES (2 MB), the base64 job message ~3 MB (a few copies while Celery parses it), and nothing is
# decoded past the header check. A single decoded bomb would need >= 400 MB (20000x20000 at one byte
# per pixel), so 96 MB separates "bounded" from "decoded a bomb" with a wide margin both ways.
PEAK_GROWTH_BOUND_KB = 96 * 1024


@pytest.mark.timeout(300)
def test_worker_fails_bad_inputs_cleanly_with_bounded_memory(worker: WorkerHarness):
    before = worker.memory_kb()
    worker.reset_peak()
    request_ids = {name: worker.submit(make(worker)) for name, make, _, _ in WORKER_BAD_CASES}
    records = worker.wait(list(request_ids.values()), timeout=120)
    after = worker.memory_kb()

    problems = []
    for name, _, error_type, fragment in WORKER_BAD_CASES:
        record = records[request_ids[name]]
        (detail,) = record.result["detail"]  # type: ignore[index]
        if not (
            record.error_type == error_type == detail["type"]
            and fragment in detail["msg"]
            and record.result_code == 422
            and detail["loc"] == ["body", "image_url"]
        ):
            problems.append(f"{name}: {record.error_type} {detail}")
        if record.attempts != 1:
            problems.append(f"{name}: ran {record.attempts} times (a bad input must not be retried)")
    assert not problems, "\n".join(problems)
    # The error document is where the result would have been.
    rid = request_ids["png-bomb"]
    body = worker.s3.get_object(
        Bucket=worker.settings.output_bucket,  # type: ignore[attr-defined]
        Key=f"{worker.settings.output_prefix}requests/{rid}/result.json",
    )["Body"].read()
    assert json.loads(body)["detail"][0]["type"] == "image_too_large"

    growth = after["VmHWM"] - before["VmRSS"]
    print(
        f"worker RSS {before['VmRSS'] // 1024} MB before, peak {after['VmHWM'] // 1024} MB during "
        f"{len(WORKER_BAD_CASES)} bad jobs (growth {growth // 1024} MB, bound {PEAK_GROWTH_BOUND_KB // 1024} "
        f"MB)"
    )
    assert growth < PEAK_GROWTH_BOUND_KB
    assert worker.stack.processes[0].poll() is None, "the worker died"


@pytest.mark.timeout(300)
def test_worker_keeps_serving_good_images_after_bad_ones(worker: WorkerHarness):
    bad = worker.submit("data:image/png;base64,@@@")  # one more bad one right before
    request_ids = {name: worker.submit(make(worker)) for name, make, _ in WORKER_GOOD_CASES}
    records = worker.wait([bad, *request_ids.values()], timeout=240)
    assert records[bad].error_type == "file_download_error"
    for name, _, size in WORKER_GOOD_CASES:
        record = records[request_ids[name]]
        assert record.error is None, (name, record.result)
        image = record.result["image"]  # type: ignore[index]
        assert (image["width"], image["height"]) == size, name
    assert worker.stack.processes[0].poll() is None
