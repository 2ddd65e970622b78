"""The web demo (`opendino demo`) through its HTTP API on the debug backbone: every endpoint's pictures decode at the
expected sizes and agree with the `opendino.viz` functions computed directly; bad uploads get a clear 4xx JSON
error and the server keeps serving; concurrent users against the real server; the page loads nothing from other
hosts; safe defaults (127.0.0.1, upload and pixel limits). The browser test is tests/test_demo_browser.py."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import re
import socket
import threading
import time
from importlib import resources

import numpy as np
import pytest
import torch
from _util import train_tiny_depth_head, write_halves_seg_dataset
from PIL import Image

from opendino import config
from opendino.cli import main
from opendino.demo import Demo, FeatureCache, InputError, Upload, examples
from opendino.models.hub import build_backbone
from opendino.viz import figures, image_features, patch_at, pca_maps, prepare_image, similarity_map

fastapi = pytest.importorskip("fastapi", reason="the demo server needs fastapi: pip install 'opendino[demo]'")
pytest.importorskip("python_multipart", reason="the demo server needs python-multipart: pip install 'opendino[demo]'")
from fastapi.testclient import TestClient  # noqa: E402

from opendino.demo.server import SECURITY_HEADERS, create_app, parse_multipart  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 64  # image_size of the test demo: debug patches of 8 px -> 8 patches on the shorter side
MAX_UPLOAD = 300_000  # bytes: small, so that "too large" is cheap to send
MAX_PIXELS = 200_000  # a 500 x 500 image is a "decompression bomb" here


# ------------------------------------------------------------------------------------------------ helpers
def png(width: int, height: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    pixels[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = (200, 40, 40)  # an object in the middle
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def decode(data_url: str) -> np.ndarray:
    prefix = "data:image/png;base64,"
    assert data_url.startswith(prefix)
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url[len(prefix) :]))))


def files(**uploads: tuple[str, bytes]) -> dict[str, tuple[str, bytes, str]]:
    return {field: (name, data, "application/octet-stream") for field, (name, data) in uploads.items()}


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_backbone("debug").eval()


@pytest.fixture(scope="module")
def demo(model) -> Demo:
    return Demo(model, label="debug", image_size=SIZE, max_pixels=MAX_PIXELS, cache_size=4)


@pytest.fixture(scope="module")
def client(demo) -> TestClient:
    return TestClient(create_app(demo, max_upload_bytes=MAX_UPLOAD), raise_server_exceptions=False)


A = ("a.png", png(96, 64, seed=1))  # input 64 x 96: 8 x 12 patches
B = ("b.png", png(60, 80, seed=2))  # portrait: shorter side 60 -> 64, longer 80 * 64 / 60 -> 88 (11 x 8 patches)


# ------------------------------------------------------------------------------------------------ defaults
def test_safe_defaults():
    cfg = config.DemoConfig(backbone="debug")
    assert cfg.host == "127.0.0.1" and cfg.port == 7860 and cfg.max_upload_mb == 20 and cfg.max_pixels == 40_000_000
    for bad in ({"port": 0}, {"port": 70000}, {"image_size": 0}, {"max_upload_mb": 0}, {"feature_cache": -1},
                {"host": ""}, {"backbone": ""}, {"threshold": float("nan")}):  # fmt: skip
        with pytest.raises(config.ConfigError):
            config.DemoConfig(**{"backbone": "debug", **bad})


def test_cli_serves_on_localhost_by_default(monkeypatch, capsys):
    import uvicorn

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append((app, kw)))
    assert main(["demo", "--backbone", "debug", "--image-size", "64"]) == 0
    ((_, kw),) = calls
    assert kw["host"] == "127.0.0.1" and kw["port"] == 7860
    assert "http://127.0.0.1:7860/" in capsys.readouterr().out
    assert main(["demo", "--backbone", "debug", "--host", "0.0.0.0", "--port", "8123", "--image-size", "64"]) == 0
    assert calls[1][1]["host"] == "0.0.0.0" and calls[1][1]["port"] == 8123
    assert "other machines can reach this page" in capsys.readouterr().out
    # an image size off the patch grid, a missing web package: one line, exit status 2
    assert main(["demo", "--backbone", "debug", "--image-size", "60"]) == 2
    assert "multiple of the patch size 8" in capsys.readouterr().err
    monkeypatch.setitem(__import__("sys").modules, "uvicorn", None)
    assert main(["demo", "--backbone", "debug"]) == 2
    assert "pip install 'opendino[demo]'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ the page
def _strip_comments(text: str, kind: str) -> str:
    if kind == "html":
        return re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r"(?m)^\s*//.*$", "", text) if kind == "js" else text


def _external_references(text: str) -> list[str]:
    """URLs to other hosts: http(s)://, protocol-relative //host in src/href/url()/import, and @import."""
    found = re.findall(r"https?://[^\s\"'<>)]+", text)
    found += re.findall(r"""(?:src|href|action)\s*=\s*["']//[^"']*""", text)
    found += re.findall(r"""url\(\s*["']?(?!data:)[a-z]*:?//[^)]*\)""", text)
    found += re.findall(r"@import[^;]*", text)
    found += re.findall(r"""(?:fetch|import)\(\s*["'`](?:https?:)?//[^"'`]*""", text)
    return found


def test_page_and_static_files_load_nothing_from_other_hosts(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == SECURITY_HEADERS["Content-Security-Policy"]
    assert "default-src 'self'" in page.headers["content-security-policy"]
    linked = re.findall(r"""(?:src|href)="(/static/[^"]+)""", page.text)
    assert sorted(linked) == ["/static/app.js", "/static/style.css"]
    assert _external_references(_strip_comments(page.text, "html")) == []
    for url in linked:
        response = client.get(url)
        assert response.status_code == 200
        kind = "js" if url.endswith(".js") else "css"
        assert _external_references(_strip_comments(response.text, kind)) == [], url
    # every file shipped in static/ (not only the linked ones), and the detector itself
    for entry in resources.files("opendino.demo").joinpath("static").iterdir():
        kind = entry.name.rsplit(".", 1)[-1]
        assert _external_references(_strip_comments(entry.read_text("utf-8"), kind)) == [], entry.name
    assert _external_references('<script src="//cdn.example.com/x.js">') and _external_references("https://a.b/c")
    assert _external_references("@import 'x.css';") and _external_references("fetch('//x.org/y')")
    # FastAPI's docs pages load Swagger UI from a CDN: they are off
    assert client.get("/docs").status_code == 404 and client.get("/openapi.json").status_code == 404


def test_info_and_examples(client):
    info = client.get("/api/info").json()
    assert info["patch_size"] == 8 and info["image_size"] == SIZE and info["num_heads"] == 3
    assert info["limits"] == {"max_pixels": MAX_PIXELS, "max_upload_bytes": MAX_UPLOAD}
    assert info["heads"] == {"depth": None, "seg": None}
    assert len(info["colormaps"]["inferno"]) == 11 and info["colormaps"]["inferno"][0] == "#000004"
    listed = {e["file"] for e in info["examples"]}
    shipped = {p.name for p in resources.files("opendino.demo").joinpath("examples").iterdir()}
    assert listed == shipped - {"examples.json"} and len(listed) >= 3
    total = 0
    for example in examples():
        assert re.search(r"public domain|CC0", example["licence"]) and example["source"]
        response = client.get(f"/examples/{example['file']}")
        assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
        image = Image.open(io.BytesIO(response.content))
        assert max(image.size) <= 512 and image.mode == "RGB"
        total += len(response.content)
    assert total < 400_000
    for name in ("nope.jpg", "examples.json", "..%2Fservice.py"):
        assert client.get(f"/examples/{name}").status_code == 404


# ------------------------------------------------------------------------------------------------ views
def test_analyze_pictures_match_the_viz_functions(client, model):
    r = client.post("/api/analyze", files=files(image=A))
    assert r.status_code == 200, r.text
    result = r.json()
    assert result["input_size"] == [64, 96] and result["grid"] == [8, 12] and result["original_size"] == [64, 96]
    assert result["name"] == "a.png" and result["threshold"] == 0 and result["depth"] is None and result["seg"] is None
    pictures = {k: decode(v) for k, v in result["pictures"].items()}
    assert sorted(pictures) == ["attention", "foreground", "input", "pca"]
    assert all(p.shape == (64, 96, 3) for p in pictures.values())
    heads = [decode(h) for h in result["attention_heads"]]
    assert len(heads) == 3 and all(h.shape == (64, 96, 3) for h in heads)
    # the same pictures from the viz API directly
    image = Image.open(io.BytesIO(A[1])).convert("RGB")
    np.testing.assert_array_equal(pictures["input"], prepare_image(image, SIZE, 8))
    maps = pca_maps([image_features(model, image, image_size=SIZE)])
    np.testing.assert_array_equal(pictures["pca"], figures.pca_picture(maps.rgb[0], (64, 96)))
    np.testing.assert_array_equal(pictures["foreground"], figures.foreground_overlay(pictures["input"], maps.masks[0]))
    assert result["foreground_fraction"] == pytest.approx(maps.masks[0].mean(), abs=1e-4)
    # a higher threshold keeps fewer foreground patches; the portrait image keeps its own shape
    high = client.post("/api/analyze", files=files(image=A), data={"threshold": "1.0"}).json()
    assert high["threshold"] == 1.0 and high["foreground_fraction"] < result["foreground_fraction"]
    portrait = client.post("/api/analyze", files=files(image=B)).json()
    assert portrait["input_size"] == [88, 64] and decode(portrait["pictures"]["pca"]).shape == (88, 64, 3)


def test_similarity_is_the_cosine_map_of_the_clicked_patch(client, model):
    x, y = 30.0, 20.0
    r = client.post("/api/similarity", files=files(image=A, other=B), data={"x": str(x), "y": str(y)})
    assert r.status_code == 200, r.text
    result = r.json()
    fa = image_features(model, Image.open(io.BytesIO(A[1])).convert("RGB"), image_size=SIZE)
    fb = image_features(model, Image.open(io.BytesIO(B[1])).convert("RGB"), image_size=SIZE)
    row, col = patch_at(fa, x, y)
    assert result["patch"] == [row, col] == [2, 3] and result["grid"] == [8, 12]
    own, across = similarity_map(fa, row, col), similarity_map(fa, row, col, fb)
    best = np.unravel_index(int(np.argmax(across)), across.shape)
    assert result["other"]["best"][0][:2] == [int(best[0]), int(best[1])]
    assert result["other"]["best"][0][2] == pytest.approx(float(across.max()), abs=1e-4)
    assert result["range"][0] == pytest.approx(min(own.min(), across.min()), abs=1e-4) and result["range"][1] == 1
    assert all([r, c] != [row, col] for r, c, _ in result["query"]["best"])  # the clicked patch is left out
    assert decode(result["query"]["picture"]).shape == (64, 96, 3)
    assert decode(result["other"]["picture"]).shape == (88, 64, 3)
    # the clicked patch is outlined in cyan just outside its pixels; without a second image there is no other map
    query = decode(result["query"]["picture"])
    assert tuple(query[row * 8 - 1, col * 8 + 4]) == (0, 255, 255) != tuple(query[row * 8, col * 8 + 4])
    alone = client.post("/api/similarity", files=files(image=A), data={"x": "0", "y": "63.9"}).json()
    assert alone["other"] is None and alone["patch"] == [7, 0]


def test_similarity_of_an_image_to_itself_finds_the_same_patch(client):
    r = client.post("/api/similarity", files=files(image=A, other=A), data={"x": "50", "y": "40"}).json()
    assert r["other"]["best"][0] == [5, 6, pytest.approx(1.0, abs=1e-4)]


def test_match_picture_and_counts(client):
    r = client.post("/api/match", files=files(image_a=A, image_b=B), data={"matches": "5"})
    assert r.status_code == 200, r.text
    result = r.json()
    assert 0 < result["count"] <= 5 and result["grids"] == [[8, 12], [11, 8]]
    assert decode(result["pictures"]["matches"]).shape == (88, 96 + 16 + 64, 3) and result["size"] == [88, 176]
    # an image against itself, every patch allowed: each patch is its own mutual nearest neighbour
    same = client.post("/api/match", files=files(image_a=A, image_b=A), data={"matches": "1000", "all_patches": "1"})
    assert same.json()["count"] == 8 * 12 and same.json()["similarity"][0] == pytest.approx(1.0, abs=1e-4)


def test_heads_add_depth_and_segmentation_views(model, depth_head, seg_head):
    demo = Demo(model, label="debug", image_size=SIZE, depth_head=depth_head, seg_head=seg_head)
    client = TestClient(create_app(demo))
    info = client.get("/api/info").json()
    assert info["heads"]["seg"]["classes"] == ["red", "blue"] and info["heads"]["depth"]["range"] == [0.001, 10.0]
    result = client.post("/api/analyze", files=files(image=A)).json()
    depth, seg = decode(result["pictures"]["depth"]), decode(result["pictures"]["seg"])
    assert depth.shape == seg.shape == (64, 96, 3)
    assert 0.001 <= result["depth"]["min"] <= result["depth"]["max"] <= 10.0
    classes = result["seg"]["classes"]
    assert {c["name"] for c in classes} <= {"red", "blue"} and sum(c["share"] for c in classes) == pytest.approx(1)
    palette = {tuple(int(c["colour"][i : i + 2], 16) for i in (1, 3, 5)) for c in classes}
    assert {tuple(p) for p in seg.reshape(-1, 3)} == palette
    # a head of the other task, or one trained on another width, is refused at start
    with pytest.raises(ValueError, match="is a seg head, not a depth head"):
        Demo(model, label="debug", image_size=SIZE, depth_head=seg_head)
    torch.manual_seed(0)
    wider = build_backbone("debug", embed_dim=48, num_heads=3).eval()
    with pytest.raises(ValueError, match="channels"):
        Demo(wider, label="wider", image_size=SIZE, seg_head=seg_head)


@pytest.fixture(scope="module")
def seg_head(tmp_path_factory):
    from opendino.eval.seg import run
    from opendino.viz import load_head

    root = write_halves_seg_dataset(tmp_path_factory.mktemp("seg"), 2)
    run(config.SegEvalConfig(backbone="debug", train=str(root), val=str(root), out=str(root / "out"), cache_dir="",
                             num_workers=0, mode="fast", iterations=10, warmup_iterations=2, resize_size=64,
                             class_names=("red", "blue")))  # fmt: skip
    return load_head(root / "out")


@pytest.fixture(scope="module")
def depth_head(tmp_path_factory):
    from opendino.viz import load_head

    images = [np.asarray(Image.open(io.BytesIO(png(64, 48, seed=10 + i))).convert("RGB")) for i in range(2)]
    return load_head(train_tiny_depth_head(tmp_path_factory.mktemp("depth"), images) / "out")


# ------------------------------------------------------------------------------------------------ bad input
def _bomb() -> bytes:  # 600 x 600 = 360,000 pixels > MAX_PIXELS, a few hundred bytes as a PNG
    buffer = io.BytesIO()
    Image.new("L", (600, 600)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("form", "data", "status", "message"),
    [
        (files(image=("notes.txt", b"just some text\n")), {}, 400, "notes.txt: not a recognised image format"),
        (files(image=("cut.png", A[1][: len(A[1]) // 2])), {}, 400, "cut.png: "),
        (files(image=("empty.png", b"")), {}, 400, "empty.png: empty file (0 bytes)"),
        (files(image=("bomb.png", _bomb())), {}, 400, "bomb.png: decompression bomb"),
        (files(image=("big.bin", b"\0" * (MAX_UPLOAD + 1))), {}, 413, "larger than the limit of 0.3 MB"),
        (files(picture=A), {}, 400, "no 'image' file in the form"),
        (files(image=A), {"threshold": "abc"}, 400, "threshold=b'abc': expected a number"),
        (files(image=A), {"threshold": "nan"}, 400, "expected a finite number"),
        (files(image=A), {"threshold": "99"}, 400, "standard deviations in [-10, 10]"),
    ],
)
def test_bad_uploads_get_a_clear_json_error(client, form, data, status, message):
    r = client.post("/api/analyze", files=form, data=data)
    assert r.status_code == status and message in r.json()["error"], r.text
    assert client.post("/api/analyze", files=files(image=A)).status_code == 200  # still serving


def test_bad_requests_of_the_other_endpoints(client):
    def error(path, status, **kw):
        r = client.post(path, **kw)
        assert r.status_code == status, r.text
        return r.json()["error"]

    assert "multipart/form-data" in error("/api/analyze", 400, content=b"raw", headers={"content-type": "image/png"})
    assert "give x and y" in error("/api/similarity", 400, files=files(image=A))
    assert "outside the 96x64 image" in error("/api/similarity", 400, files=files(image=A), data={"x": "96", "y": "0"})
    assert "image B.png: not a recognised" in error(
        "/api/similarity", 400, files=files(image=A, other=("image B.png", b"GIF89a...")), data={"x": "1", "y": "1"}
    )
    assert "no 'image_b' file" in error("/api/match", 400, files=files(image_a=A))
    assert "expected a whole number" in error(
        "/api/match", 400, files=files(image_a=A, image_b=B), data={"matches": "2.5"}
    )
    assert "1 to 1000 lines" in error("/api/match", 400, files=files(image_a=A, image_b=B), data={"matches": "0"})
    # the Content-Length is checked before reading the body
    big = error(
        "/api/match", 413, content=b"x" * (MAX_UPLOAD + 10), headers={"content-type": "multipart/form-data; boundary=x"}
    )
    assert "MB is larger than the limit" in big


def test_an_internal_failure_is_a_json_500_and_the_server_goes_on(demo, monkeypatch):
    client = TestClient(create_app(demo), raise_server_exceptions=False)

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(demo, "match", broken)
    r = client.post("/api/match", files=files(image_a=A, image_b=B))
    assert r.status_code == 500 and r.json() == {"error": "internal error: RuntimeError: out of memory (simulated)"}
    assert client.post("/api/analyze", files=files(image=A)).status_code == 200


def test_uploads_are_parsed_in_memory(demo, monkeypatch):
    import builtins
    import os
    import tempfile

    def no_disk(*args, **kwargs):
        raise AssertionError(f"a request tried to write a file: {args[:2]}")

    real_open = builtins.open

    def read_only_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            no_disk(file, mode)
        return real_open(file, mode, *args, **kwargs)

    for name in ("TemporaryFile", "NamedTemporaryFile", "SpooledTemporaryFile", "mkstemp", "mkdtemp"):
        monkeypatch.setattr(tempfile, name, no_disk)
    monkeypatch.setattr(builtins, "open", read_only_open)
    monkeypatch.setattr(os, "open", no_disk)
    # 1.5 MiB: more than the 1 MiB that Starlette's own form parser would keep in memory before spooling to disk
    big = png(96, 64, seed=3) + b"\0" * (3 * 2**19)  # bytes after the PNG's end are ignored by the decoder
    client = TestClient(create_app(demo, max_upload_bytes=2**21), raise_server_exceptions=False)
    r = client.post("/api/analyze", files=files(image=("big.png", big)))
    assert r.status_code == 200, r.text


def test_parse_multipart_edge_cases():
    boundary = "XyZ"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="x"\r\n\r\n1.5\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a b.png"\r\n'
        f"Content-Type: image/png\r\n\r\n\r\n--not-the-boundary\r\n\r\n--{boundary}--\r\n"
    ).encode()
    parts = parse_multipart(body, f"multipart/form-data; boundary={boundary}")
    assert parts["x"] == Upload("", b"1.5") and parts["image"] == Upload("a b.png", b"\r\n--not-the-boundary\r\n")
    with pytest.raises(InputError, match="multipart/form-data"):
        parse_multipart(body, "multipart/form-data")
    twice = body.replace(b'name="image"', b'name="x"')
    with pytest.raises(InputError, match="repeated"):
        parse_multipart(twice, f"multipart/form-data; boundary={boundary}")


# ------------------------------------------------------------------------------------------------ users
def test_feature_cache_is_a_bounded_lru():
    cache = FeatureCache(2)
    for key in ("a", "b"):
        cache.put((key, 64), key)  # type: ignore[arg-type]
    assert cache.get(("a", 64)) == "a"  # "a" is now the most recent: "b" goes first
    cache.put(("c", 64), "c")  # type: ignore[arg-type]
    assert cache.get(("b", 64)) is None and cache.get(("a", 64)) == "a" and len(cache) == 2
    off = FeatureCache(0)
    off.put(("a", 64), "a")  # type: ignore[arg-type]
    assert off.get(("a", 64)) is None
    with pytest.raises(ValueError, match=">= 0"):
        FeatureCache(-1)


def test_similarity_after_analysis_reuses_the_forward_pass(model):
    demo = Demo(model, label="debug", image_size=SIZE, cache_size=2)
    calls = []
    original = model.forward_features
    try:
        model.forward_features = lambda *a, **k: calls.append(1) or original(*a, **k)  # type: ignore[method-assign]
        demo.analyze(Upload(*A))
        assert len(calls) == 1
        cached = demo.similarity(Upload(*A), 10, 10)
        assert len(calls) == 1
        fresh = Demo(model, label="debug", image_size=SIZE, cache_size=0).similarity(Upload(*A), 10, 10)
        assert len(calls) == 2
    finally:
        del model.forward_features
    assert cached["query"] == fresh["query"] and cached["range"] == fresh["range"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_several_users_at_once_on_the_real_server(model):
    import httpx
    import uvicorn

    demo = Demo(model, label="debug", image_size=SIZE, cache_size=0)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(demo), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}"
        jobs = [
            ("/api/analyze", files(image=A), {}),
            ("/api/analyze", files(image=B), {}),
            ("/api/similarity", files(image=A, other=B), {"x": "30", "y": "20"}),
            ("/api/match", files(image_a=A, image_b=B), {"matches": "5"}),
            ("/api/analyze", files(image=("bad.txt", b"not an image")), {}),
        ] * 3

        def send(job):
            path, form, data = job
            with httpx.Client(base_url=url, timeout=60) as http:
                r = http.post(path, files=form, data=data)
                return path, r.status_code, r.json()

        with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
            answers = list(pool.map(send, jobs))
        assert [status for _, status, _ in answers] == [200, 200, 200, 200, 400] * 3

        # each answer is the one a lone request gets: requests share no state
        def strip(answer):
            return {k: v for k, v in answer.items() if k != "seconds"}

        for i in range(5):
            assert strip(answers[i][2]) == strip(answers[i + 5][2]) == strip(answers[i + 10][2])
        assert strip(answers[0][2]) == strip(demo.analyze(Upload(*A)))
    finally:
        server.should_exit = True
        thread.join(timeout=10)
