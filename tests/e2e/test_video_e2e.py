"""`fal-ai/birefnet/v2/video` end to end: real Redis, moto, gateway, worker and webhook processes, on tiny
generated clips (a moving square over a gradient, with a sine audio track)."""

from __future__ import annotations

import base64
import time
import uuid

import httpx
import pytest

from common.state.jobs import JobStore
from tests.forward_hook import Rule, hook_setting
from tests.helpers.fal_client import run_client
from tests.helpers.gateway import GatewayStack, start_gateway_stack
from tests.helpers.video import make_audio_only, make_clip, make_frameless, read_video

VIDEO_APP = "fal-ai/birefnet/v2/video"
SLOW_WIDTH = 122  # frames of this width take 0.3 s a forward (tests/forward_hook.py)


def data_uri(path, content_type: str = "video/mp4") -> str:
    with open(path, "rb") as fh:
        return f"data:{content_type};base64,{base64.b64encode(fh.read()).decode()}"


@pytest.fixture(scope="module")
def gs(redis_server, moto_endpoint, tmp_path_factory) -> GatewayStack:
    tmp = tmp_path_factory.mktemp("video")
    stack = start_gateway_stack(
        redis_server.port,
        moto_endpoint,
        tmp,
        tls=True,
        extra={
            "BIREFNET_VIDEO_MAX_SECONDS": "2.5",
            "BIREFNET_VIDEO_MAX_PIXELS": str(128 * 80),  # the clips here are 96x64 and 122x64
            "BIREFNET_VIDEO_MAX_BYTES": str(200_000),  # and under 100 kB
            "BIREFNET_VIDEO_SEGMENT_SECONDS": "0.4",  # a 1 s clip: 3 segments
            "BIREFNET_TEST_FORWARD_HOOK": hook_setting(tmp / "hook", Rule(width=SLOW_WIDTH, seconds=0.3)),
        },
    )
    yield stack
    stack.close()


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> str:
    return make_clip(
        str(tmp_path_factory.mktemp("clips") / "clip.mp4"), width=96, height=64, seconds=1.0, fps=12
    )


def fetch_to(path, url: str) -> dict:
    data = base64.b64decode(url.split(",", 1)[1]) if url.startswith("data:") else httpx.get(url).content
    path.write_bytes(data)
    return read_video(str(path))


@pytest.mark.timeout(240)
def test_python_client_subscribe_webm_with_alpha_and_mask(gs, clip, tmp_path):
    got = run_client(
        gs,
        f"""
        logs = []
        def on_update(status):
            logs.extend(e["message"] for e in (getattr(status, "logs", None) or []))
        result = fal_client.subscribe({VIDEO_APP!r}, arguments={{"video_url": {data_uri(clip)!r},
            "output_mask": True, "video_output_type": "VP9 (.webm)"}}, with_logs=True,
            on_queue_update=on_update)
        out({{"result": result, "logs": logs}})
    """,
    )
    video, mask = got["result"]["video"], got["result"]["mask_video"]
    assert video["content_type"] == "video/webm" and video["file_name"] == "video.webm"
    assert (video["width"], video["height"], video["num_frames"]) == (96, 64, 12)
    out = fetch_to(tmp_path / "out.webm", video["url"])
    source = read_video(clip)
    assert out["frames"] == 12 and out["times"] == source["times"] and out["audio"]
    assert out["alpha"] is not None and out["alpha"].min() < 128 < out["alpha"].max()  # a cutout, not opaque
    grey = fetch_to(tmp_path / "mask.webm", mask["url"])
    assert grey["frames"] == 12 and not grey["audio"]
    # Split into segments (0.4 s each), joined in order: progress says so.
    assert any("split into 3 segments" in line for line in got["logs"])
    assert any("(3/3 segments)" in line for line in got["logs"]) and "joined 3 segments" in got["logs"]


@pytest.mark.timeout(240)
def test_http_queue_mp4_prores_gif_and_vfr(gs, tmp_path):
    vfr = make_clip(str(tmp_path / "vfr.mp4"), frame_pts=[0, 40, 120, 130, 300, 310, 500], audio=False)
    with gs.client() as client:
        ids = {}
        for kind, source in (("X264 (.mp4)", vfr), ("PRORES4444 (.mov)", vfr), ("GIF (.gif)", vfr)):
            r = client.post(
                f"/queue/{VIDEO_APP}",
                json={
                    "video_url": data_uri(source),
                    "video_output_type": kind,
                    "background_color": "#00ff00",
                },
            )
            assert r.status_code == 200, r.text
            ids[kind] = r.json()["request_id"]
        results = {}
        for kind, rid in ids.items():
            gs.wait_status(rid, timeout=120)
            results[kind] = client.get(f"/queue/fal-ai/birefnet/requests/{rid}").json()
    source = read_video(vfr)
    mp4 = fetch_to(tmp_path / "o.mp4", results["X264 (.mp4)"]["video"]["url"])
    assert mp4["codec"] == "h264" and mp4["times"] == source["times"]  # variable frame rate kept
    mov = fetch_to(tmp_path / "o.mov", results["PRORES4444 (.mov)"]["video"]["url"])
    assert mov["codec"] == "prores" and mov["alpha"] is not None and mov["times"] == source["times"]
    gif = results["GIF (.gif)"]["video"]
    assert gif["content_type"] == "image/gif" and fetch_to(tmp_path / "o.gif", gif["url"])["frames"] == 7
    assert results["X264 (.mp4)"]["mask_video"] is None


@pytest.mark.timeout(240)
def test_sync_run_returns_data_uris(gs, clip, tmp_path):
    with gs.client() as client:
        r = client.post(
            f"/run/{VIDEO_APP}", json={"video_url": data_uri(clip), "sync_mode": True}, timeout=120
        )
    assert r.status_code == 200, r.text
    video = r.json()["video"]
    assert video["url"].startswith("data:video/mp4;base64,")
    assert fetch_to(tmp_path / "s.mp4", video["url"])["audio"]


def submit_and_result(gs, body: dict) -> tuple[int, dict]:
    with gs.client() as client:
        rid = client.post(f"/queue/{VIDEO_APP}", json=body).json()["request_id"]
        gs.wait_status(rid, timeout=120)
        r = client.get(f"/queue/fal-ai/birefnet/requests/{rid}")
    return r.status_code, r.json()


@pytest.mark.timeout(240)
def test_bad_inputs_get_clear_errors(gs, tmp_path):
    good = make_clip(str(tmp_path / "good.mp4"), seconds=1.0)
    data = (tmp_path / "good.mp4").read_bytes()
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(data[: len(data) // 3] + bytes(len(data) // 3) + data[2 * len(data) // 3 :])
    text = tmp_path / "page.html"
    text.write_bytes(b"<html>not a video</html>")
    (tmp_path / "noise.mp4").write_bytes(bytes(range(256)) * 1200)  # 300 kB: over the 200 kB limit
    cases = {
        "not a video": (data_uri(text, "text/html"), "video_load_error", "cannot read the file as a video"),
        "audio only": (
            data_uri(make_audio_only(str(tmp_path / "a.mp4"))),
            "video_load_error",
            "no video stream",
        ),
        "too long": (
            data_uri(make_clip(str(tmp_path / "long.mp4"), seconds=3.0, fps=4, audio=False)),
            "video_too_large",
            "the limit is 2s",
        ),
        "corrupt": (data_uri(corrupt), "video_load_error", ""),
        "zero frames": (
            data_uri(make_frameless(str(tmp_path / "empty.mp4"))),
            "video_load_error",
            "the video has no frames",
        ),
        "too large (frame)": (
            data_uri(make_clip(str(tmp_path / "big.mp4"), width=160, height=96, seconds=0.5, audio=False)),
            "video_too_large",
            "160x96",
        ),
        "too large (file)": (
            data_uri(tmp_path / "noise.mp4"),
            "video_too_large",
            "the limit is 200000 bytes",
        ),
    }
    for name, (url, error_type, words) in cases.items():
        code, body = submit_and_result(gs, {"video_url": url})
        assert code == 422, (name, body)
        entry = body["detail"][0]
        assert entry["type"] == error_type and entry["loc"] == ["body", "video_url"], (name, body)
        assert words in entry["msg"], (name, entry)
    code, body = submit_and_result(gs, {"video_url": data_uri(good), "video_output_type": "AVI"})
    assert code == 422 and body["detail"][0]["loc"] == ["body", "video_output_type"]
    assert "'X264 (.mp4)'" in body["detail"][0]["msg"]
    # The good clip still works afterwards: nothing else was lost.
    code, body = submit_and_result(gs, {"video_url": data_uri(good)})
    assert code == 200 and body["video"]["num_frames"] == 12


@pytest.mark.timeout(240)
def test_cancel_mid_video_stops_within_the_video(gs, tmp_path):
    slow = make_clip(
        str(tmp_path / "slow.mp4"), width=SLOW_WIDTH, height=64, seconds=2.0, fps=12, audio=False
    )
    with gs.client() as client:
        rid = client.post(f"/queue/{VIDEO_APP}", json={"video_url": data_uri(slow)}).json()["request_id"]

        def frames_logged() -> bool:
            logs = client.get(f"/queue/fal-ai/birefnet/requests/{rid}/status", params={"logs": 1}).json()[
                "logs"
            ]
            return any(entry["message"].startswith("frames ") for entry in logs or [])

        deadline = time.monotonic() + 60
        while not frames_logged():
            assert time.monotonic() < deadline
            time.sleep(0.1)
        cancelled_at = time.monotonic()
        assert client.put(f"/queue/fal-ai/birefnet/requests/{rid}/cancel").status_code == 202
        gs.wait_status(rid, timeout=60)
        ended = time.monotonic() - cancelled_at
        r = client.get(f"/queue/fal-ai/birefnet/requests/{rid}")
        logs = client.get(f"/queue/fal-ai/birefnet/requests/{rid}/status", params={"logs": 1}).json()["logs"]
    assert r.status_code == 499
    # 24 frames at 0.4 s a forward would take ~10 s; the cancel took effect after a few frames.
    assert ended < 5, (ended, "\n".join(f"{e['timestamp']} {e['message']}" for e in logs))
    assert any(entry["message"].startswith("cancelled ") for entry in logs)


@pytest.mark.timeout(300)
def test_worker_killed_mid_video_costs_only_its_segment(gs, tmp_path, webhook_receiver):
    """Two workers share one video; the one holding a segment (not the video's own job) is killed: that
    segment alone runs again, and the request gets one result and one webhook."""
    gs.stack.start_worker("general-light", name="worker-video-second")
    store = JobStore.from_url(gs.settings.redis_url)
    slow = make_clip(str(tmp_path / "kill.mp4"), width=SLOW_WIDTH, height=64, seconds=2.0, fps=12)
    with gs.client() as client:
        rid = client.post(
            f"/queue/{VIDEO_APP}",
            params={"fal_webhook": webhook_receiver.url},
            json={"video_url": data_uri(slow)},
        ).json()["request_id"]
    children = [str(uuid.uuid5(uuid.NAMESPACE_URL, f"{rid}/segment/{i}")) for i in range(5)]

    def victim() -> tuple[str, int] | None:
        parent = store.get(rid)
        if parent is None or not parent.worker:
            return None
        for child in children:
            record = store.get(child)
            if (
                record is not None
                and record.status == "IN_PROGRESS"
                and record.worker
                and record.worker != parent.worker
            ):
                return child, int(record.worker.rsplit(":", 1)[1])
        return None

    deadline = time.monotonic() + 60
    while (found := victim()) is None:
        assert time.monotonic() < deadline, "no segment ran on the second worker"
        time.sleep(0.05)
    killed_segment, pid = found
    proc = next(p for p in gs.stack.processes if p.pid == pid)
    proc.kill()
    proc.wait()
    gs.wait_status(rid, timeout=120)
    with gs.client() as client:
        r = client.get(f"/queue/fal-ai/birefnet/requests/{rid}")
    assert r.status_code == 200, r.text
    out = fetch_to(tmp_path / "joined.mp4", r.json()["video"]["url"])
    assert out["frames"] == 24 and out["audio"]
    # Source timestamps kept (the MP4 muxer's timescale rounds some by at most a millisecond)
    assert max(abs(a - b) for a, b in zip(out["times"], read_video(slow)["times"], strict=True)) <= 0.0015
    attempts = {child: store.get(child).attempts for child in children}  # type: ignore[union-attr]
    assert attempts[killed_segment] == 2, attempts
    assert all(n == 1 for child, n in attempts.items() if child != killed_segment), attempts
    webhook_receiver.wait(1)
    time.sleep(1.0)
    hooks = [h for h in webhook_receiver.received if h.json().get("request_id") == rid]
    assert len(hooks) == 1 and hooks[0].json()["status"] == "OK"


@pytest.mark.timeout(300)
def test_video_upload_to_the_bucket_becomes_a_video_job(stack, webhook_receiver, tmp_path):
    """A video landing in the input bucket (moto's S3 -> SQS events, the real producer) is cut as a video;
    its result lands in the output bucket and comes by webhook."""
    import boto3

    from common.adapters.storage import boto_config

    settings = stack.settings
    s3 = boto3.client(
        "s3", region_name=settings.aws_region, endpoint_url=settings.s3_endpoint_url, config=boto_config()
    )
    stack.start(["-m", "producer", "sqs"], "producer")
    stack.start(["-m", "deliverer", "--concurrency", "2"], "webhooks")
    stack.start_worker(
        "general-light", name="worker", extra_env={"BIREFNET_TEST_OPERATING_RESOLUTION": "128x128"}
    )
    source = make_clip(str(tmp_path / "up.mp4"), width=64, height=48, seconds=1.0, fps=8)
    with open(source, "rb") as fh:
        s3.put_object(
            Bucket=settings.input_bucket,
            Key="clips/holiday.mp4",
            Body=fh.read(),
            Metadata={
                "webhook_url": webhook_receiver.url,
                "video_output_type": "VP9 (.webm)",
                "output-mask": "true",
            },
        )
    (delivery,) = webhook_receiver.wait(1, timeout=240)
    body = delivery.json()
    assert body["status"] == "OK", body
    video, mask = body["payload"]["video"], body["payload"]["mask_video"]
    assert video["content_type"] == "video/webm" and mask["file_name"] == "mask.webm"
    out = fetch_to(tmp_path / "up.webm", video["url"])
    assert out["frames"] == 8 and out["audio"] and out["alpha"] is not None
    listed = s3.list_objects_v2(Bucket=settings.output_bucket)["Contents"]
    assert any(item["Key"].endswith("video.webm") for item in listed)


@pytest.mark.timeout(240)
def test_js_client_subscribe(gs, clip, tmp_path):
    """fal's JS client (@fal-ai/client from tests/js), unchanged but for its proxy URL, against the video
    endpoint."""
    import json
    import os
    import shutil
    import subprocess

    from tests.helpers.gateway import ALICE
    from tests.helpers.stack import ROOT

    node, modules = shutil.which("node"), ROOT / "tests" / "js" / "node_modules"
    if not node or not (modules / "@fal-ai" / "client").is_dir():
        pytest.skip("node or tests/js/node_modules missing (make test installs @fal-ai/client with npm)")
    (tmp_path / "node_modules").symlink_to(modules)
    script = tmp_path / "video.mjs"
    script.write_text(f"""
import {{ fal }} from "@fal-ai/client";
fal.config({{ proxyUrl: {{ url: `${{process.env.GATEWAY_URL}}/api/fal/proxy`, when: "always" }} }});
const statuses = [];
const {{ data, requestId }} = await fal.subscribe("{VIDEO_APP}", {{
  input: {{ video_url: {json.dumps(data_uri(clip))}, video_output_type: "PRORES4444 (.mov)", output_mask:
  true }},
  logs: true, onQueueUpdate: (update) => statuses.push(update.status) }});
console.log("RESULT " + JSON.stringify({{ data, requestId, statuses }}));
""")
    env = {
        **os.environ,
        "FAL_KEY": ALICE,
        "NODE_EXTRA_CA_CERTS": str(gs.gateway.tls.ca),
        "GATEWAY_URL": gs.url,
    }
    done = subprocess.run(
        [node, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=200
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout + done.stderr
    got = json.loads(lines[-1][len("RESULT ") :])
    assert got["statuses"][-1] == "COMPLETED" and got["requestId"]
    video, mask = got["data"]["video"], got["data"]["mask_video"]
    assert video["content_type"] == "video/quicktime" and mask["file_name"] == "mask.mov"
    out = fetch_to(tmp_path / "js.mov", video["url"])
    assert out["frames"] == 12 and out["codec"] == "prores" and out["alpha"] is not None


def test_playground_offers_the_video_endpoint(gs):
    """The playground's data: the video endpoint with its own fields; its page may play videos from
    anywhere."""
    with gs.client(None) as anonymous:
        options = anonymous.get("/playground/options.json").json()
        page = anonymous.get("/playground")
        script = anonymous.get("/playground/playground.js").text
    video = options["endpoints"]["v2/video"]
    assert video["app_id"] == VIDEO_APP and video["url_field"] == "video_url"
    assert video["fields"]["video_output_type"]["default"] == "X264 (.mp4)"
    assert video["variants"]["General Use (Light)"] == "general-light"
    assert "media-src *" in page.headers["content-security-policy"] and 'value="v2/video"' in page.text
    assert 'showVideo("cutout-video"' in script and 'showVideo("mask-video"' in script


@pytest.mark.timeout(300)
def test_video_worker_killed_mid_video_reuses_finished_segments(gs, tmp_path, webhook_receiver):
    """The worker holding the video's own job is killed after some segments are stored: the job is
    redelivered, and its new run keeps every finished segment (each ran once)."""
    store = JobStore.from_url(gs.settings.redis_url)
    for _ in range(2):  # two live workers, whatever earlier tests killed
        gs.stack.start_worker("general-light", name=f"worker-video-{uuid.uuid4().hex[:6]}")
    slow = make_clip(str(tmp_path / "parent.mp4"), width=SLOW_WIDTH, height=64, seconds=2.0, fps=12)
    with gs.client() as client:
        rid = client.post(
            f"/queue/{VIDEO_APP}",
            params={"fal_webhook": webhook_receiver.url},
            json={"video_url": data_uri(slow)},
        ).json()["request_id"]
    children = [str(uuid.uuid5(uuid.NAMESPACE_URL, f"{rid}/segment/{i}")) for i in range(5)]

    def finished() -> list[str]:
        return [c for c in children if (r := store.get(c)) is not None and r.status == "COMPLETED"]

    deadline = time.monotonic() + 90
    while len(finished()) < 2:
        assert time.monotonic() < deadline, "segments did not finish"
        time.sleep(0.05)
    done_before = finished()
    parent = store.get(rid)
    assert parent is not None and parent.worker and parent.status == "IN_PROGRESS"
    proc = next(p for p in gs.stack.processes if p.pid == int(parent.worker.rsplit(":", 1)[1]))
    proc.kill()
    proc.wait()
    gs.wait_status(rid, timeout=180)
    with gs.client() as client:
        r = client.get(f"/queue/fal-ai/birefnet/requests/{rid}")
    assert r.status_code == 200, r.text
    assert fetch_to(tmp_path / "p.mp4", r.json()["video"]["url"])["frames"] == 24
    assert store.get(rid).attempts == 2  # type: ignore[union-attr]
    assert all(store.get(c).attempts == 1 for c in done_before)  # type: ignore[union-attr]
    webhook_receiver.wait(1)
    time.sleep(1.0)
    assert len([h for h in webhook_receiver.received if h.json().get("request_id") == rid]) == 1
