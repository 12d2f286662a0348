"""The demo corpus and the local web server that serves it (also used by tests and benchmarks).

`python -m pipeline.demo serve --root DIR --port-file F` serves DIR/files and a set of hostile
endpoints on 127.0.0.1 only; `python -m pipeline.demo corpus --root DIR --base-url URL` writes the
images and DIR/rows.csv, a few hundred rows covering every way a web row can go wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import random
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

from aiohttp import web
from PIL import Image

from pipeline import synthetic

# ---------------------------------------------------------------------------------------------
# Server
# ---------------------------------------------------------------------------------------------

_CONTENT_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".gif": "image/gif",
                  ".webp": "image/webp", ".svg": "image/svg+xml", ".html": "text/html", ".bin": "application/octet-stream"}
STALL_SECONDS = 120  # bounded: a stalled request ends by itself even if no client gives up
# The site's policies (README, "Site policies"): one disallowed folder, one TDM-reserved folder.
ROBOTS_TXT = "User-agent: *\nDisallow: /private/\nAllow: /\n\nUser-agent: otherbot\nDisallow: /\n"
TDMREP_JSON = '[{"location": "/reserved/*", "tdm-reservation": 1, "tdm-policy": "https://example.invalid/tdm"}]'


def make_app(root: Path, latency_ms: float = 0.0) -> web.Application:
    files = root / "files"
    flaky_counts: dict[str, int] = {}
    gauge = {"now": 0, "peak": 0, "user_agents": set()}  # concurrency probe for tests

    @web.middleware
    async def latency(request, handler):
        if latency_ms:
            await asyncio.sleep(latency_ms / 1000.0)
        return await handler(request)

    def file_response(name: str, **headers) -> web.StreamResponse:
        path = (files / name).resolve()
        if files.resolve() not in path.parents or not path.is_file():
            return web.Response(status=404, text="not found")
        content_type = headers.pop("content_type", None) or _CONTENT_TYPES.get(path.suffix, "application/octet-stream")
        return web.Response(body=path.read_bytes(), content_type=content_type, headers=headers)

    async def serve_file(request):
        return file_response(request.match_info["name"], content_type=request.query.get("type"))

    async def status(request):
        return web.Response(status=int(request.match_info["code"]), text="status")

    async def stall(request):
        await asyncio.sleep(STALL_SECONDS)
        return web.Response(text="late")

    async def drip(request):
        response = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        await response.prepare(request)
        for _ in range(STALL_SECONDS):
            await response.write(b"\xff")
            await asyncio.sleep(1.0)
        return response

    async def html_page(request):
        return web.Response(text="<!doctype html><html><body><h1>Not an image</h1></body></html>", content_type="text/html")

    async def redirect(request):
        hops = int(request.match_info["hops"])
        target = request.query.get("to", "")
        location = f"/redirect/{hops - 1}?to={target}" if hops > 1 else f"/files/{target}"
        raise web.HTTPFound(location)

    async def loop_a(request):
        raise web.HTTPFound("/loop-b")

    async def loop_b(request):
        raise web.HTTPFound("/loop-a")

    async def redirect_out(request):
        raise web.HTTPFound(f"http://127.0.0.1:{int(request.query['port'])}/files/{request.query.get('to', 'x.jpg')}")

    async def flaky(request):
        code = int(request.match_info["code"])
        key = request.match_info["key"]
        failures = int(request.query.get("fail", "1"))
        seen = flaky_counts.get(key, 0)
        flaky_counts[key] = seen + 1
        if seen < failures:
            return web.Response(status=code, headers={"Retry-After": request.query.get("after", "1")}, text="busy")
        flaky_counts[key] = 0  # the next run sees the same fail-then-succeed sequence
        return file_response(request.query["to"])

    async def noai(request):
        return file_response(request.match_info["name"], **{"X-Robots-Tag": "noai, noimageai"})

    async def huge(request):
        response = web.StreamResponse(headers={"Content-Type": "image/jpeg", "Content-Length": str(2_000_000_000)})
        await response.prepare(request)
        for _ in range(64):  # a client that ignores Content-Length still gets a bounded stream
            await response.write(b"\0" * 65536)
        return response

    async def huge_chunked(request):
        response = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for _ in range(2048):  # at most 128 MiB, then the server stops by itself
            await response.write(b"\xff\xd8\xff" + b"\0" * 65533)
        return response

    async def slow(request):
        """Holds each request for `ms` and records the peak number served at once."""
        gauge["now"] += 1
        gauge["peak"] = max(gauge["peak"], gauge["now"])
        gauge["user_agents"].add(request.headers.get("User-Agent", ""))
        try:
            await asyncio.sleep(float(request.query.get("ms", "300")) / 1000.0)
        finally:
            gauge["now"] -= 1
        return file_response(request.query["to"])

    async def robots_txt(request):
        return web.Response(text=ROBOTS_TXT)

    async def tdmrep_json(request):
        return web.Response(text=TDMREP_JSON, content_type="application/json")

    async def policy_file(request):
        """/private/ (robots.txt), /reserved/ (tdmrep.json), /tdm/ and /ai-pref/ (response headers)."""
        headers = {"tdm": {"tdm-reservation": "1"}, "ai-pref": {"Content-Usage": "train-ai=n, search=y"}}
        return file_response(request.match_info["name"], **headers.get(request.match_info["folder"], {}))

    async def stats(request):
        if "reset" in request.query:
            gauge.update(now=0, peak=0, user_agents=set())
        return web.json_response({"peak": gauge["peak"], "user_agents": sorted(gauge["user_agents"])})

    app = web.Application(middlewares=[latency])
    app.add_routes([
        web.get("/files/{name}", serve_file),
        web.get("/status/{code}", status),
        web.get("/stall", stall),
        web.get("/drip", drip),
        web.get("/html", html_page),
        web.get("/redirect/{hops}", redirect),
        web.get("/loop-a", loop_a),
        web.get("/loop-b", loop_b),
        web.get("/redirect-out", redirect_out),
        web.get("/flaky/{code}/{key}", flaky),
        web.get("/noai/{name}", noai),
        web.get("/huge", huge),
        web.get("/huge-chunked", huge_chunked),
        web.get("/slow/{index}", slow),
        web.get("/stats", stats),
        web.get("/robots.txt", robots_txt),
        web.get("/.well-known/tdmrep.json", tdmrep_json),
        web.get("/{folder:private|reserved|tdm|ai-pref}/{name}", policy_file),
    ])
    return app


def start_server(root: Path, latency_ms: float = 0.0, timeout_s: float = 30.0) -> tuple[subprocess.Popen, int]:
    """Start `serve` in a child process (so it never competes for the caller's GIL) and return
    (process, port) once it listens on 127.0.0.1."""
    root.mkdir(parents=True, exist_ok=True)
    port_file = root / "port"
    port_file.unlink(missing_ok=True)
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline.demo", "serve", "--root", str(root), "--port-file", str(port_file),
         "--latency-ms", str(latency_ms)],
        cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + timeout_s
    while not port_file.exists() or not port_file.read_text().strip():
        if time.monotonic() > deadline or process.poll() is not None:
            process.kill()
            raise RuntimeError("the local demo server did not start")
        time.sleep(0.05)
    return process, int(port_file.read_text())


def serve(root: Path, port: int, port_file: str | None, latency_ms: float) -> None:
    async def main():
        runner = web.AppRunner(make_app(root, latency_ms), access_log=None, keepalive_timeout=30)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", port, backlog=1024)
        await site.start()
        bound = site._server.sockets[0].getsockname()[1]  # noqa: SLF001 - aiohttp exposes no getter
        if port_file:
            Path(port_file).write_text(str(bound))
        print(f"serving {root} on http://127.0.0.1:{bound}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


# ---------------------------------------------------------------------------------------------
# Corpus
# ---------------------------------------------------------------------------------------------

TRANSLATIONS = {
    "de": ("ein {colour} {shape} auf {background} Hintergrund",
           {"red": "roter", "green": "grüner", "blue": "blauer", "yellow": "gelber", "purple": "lila",
            "orange": "oranger", "black": "schwarzer", "white": "weißer"},
           {"circle": "Kreis", "square": "Quadrat", "triangle": "Dreieck", "star": "Stern", "cross": "Kreuz", "ring": "Ring"},
           {"grey": "grauem", "pink": "rosa", "teal": "türkisem", "beige": "beigem", "navy": "marineblauem"}),
    "fr": ("un {shape} {colour} sur un fond {background}",
           {"red": "rouge", "green": "vert", "blue": "bleu", "yellow": "jaune", "purple": "violet",
            "orange": "orange", "black": "noir", "white": "blanc"},
           {"circle": "cercle", "square": "carré", "triangle": "triangle", "star": "étoile", "cross": "croix", "ring": "anneau"},
           {"grey": "gris", "pink": "rose", "teal": "turquoise", "beige": "beige", "navy": "bleu marine"}),
    "es": ("un {shape} {colour} sobre un fondo {background}",
           {"red": "rojo", "green": "verde", "blue": "azul", "yellow": "amarillo", "purple": "morado",
            "orange": "naranja", "black": "negro", "white": "blanco"},
           {"circle": "círculo", "square": "cuadrado", "triangle": "triángulo", "star": "estrella", "cross": "cruz", "ring": "anillo"},
           {"grey": "gris", "pink": "rosa", "teal": "verde azulado", "beige": "beige", "navy": "azul marino"}),
}


def translate(attrs: synthetic.Attributes, lang: str) -> str:
    template, colours, shapes, backgrounds = TRANSLATIONS[lang]
    return template.format(colour=colours[attrs.colour], shape=shapes[attrs.shape], background=backgrounds[attrs.background])


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header declares width x height pixels (a decompression bomb's signature)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    raw = zlib.compress(b"\0" * 1024)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", raw) + chunk(b"IEND", b""))


def _jpeg(image: Image.Image, quality: int = 90) -> bytes:
    return synthetic.encode_jpeg(image, quality)


def make_corpus(root: Path, base_url: str, good: int = 200, seed: int = 7) -> Path:
    """Write images under root/files and the input table root/rows.csv. Returns the csv path."""
    files = root / "files"
    files.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows: list[tuple[str, str, str]] = []  # (url, caption, what it is)

    def put(name: str, data: bytes) -> str:
        (files / name).write_bytes(data)
        return f"{base_url}/files/{name}"

    goods = []
    for index, (attrs, image) in enumerate(synthetic.iter_samples(good, size=rng.choice([384, 448, 512]), seed=seed)):
        size = rng.choice([320, 384, 512, 640])
        image = image.resize((size, int(size * rng.uniform(0.75, 1.0))))
        url = put(f"good_{index:04d}.jpg", _jpeg(image))
        goods.append((attrs, image, url))
        rows.append((url, attrs.caption(), "good"))

    for index, (attrs, image, url) in enumerate(goods[:8]):  # same url + caption twice
        rows.append((url, attrs.caption(), "duplicate_row"))
    for index, (attrs, image, _) in enumerate(goods[8:18]):  # same bytes, other url
        data = (files / f"good_{index + 8:04d}.jpg").read_bytes()
        rows.append((put(f"copy_{index:04d}.jpg", data), attrs.caption() + " (copy)", "duplicate_exact"))
    for index, (attrs, image, _) in enumerate(goods[18:33]):  # resized + recompressed
        smaller = image.resize((image.width * 3 // 4, image.height * 3 // 4))
        rows.append((put(f"near_{index:04d}.jpg", _jpeg(smaller, 60)), attrs.caption(), "duplicate_near"))
    for index, (attrs, image, _) in enumerate(goods[33:48]):  # non-English captions
        lang = ("de", "fr", "es")[index % 3]
        flipped = image.transpose(Image.Transpose.ROTATE_90)
        rows.append((put(f"lang_{index:04d}.jpg", _jpeg(flipped)), translate(attrs, lang), f"lang_{lang}"))
    combos = synthetic.all_attributes()
    for index, (attrs, image, _) in enumerate(goods[48:63]):  # mismatched captions
        other = next(c for c in combos[rng.randrange(len(combos)):] + combos
                     if c.shape != attrs.shape and c.colour != attrs.colour and c.background != attrs.background)
        mirrored = image.transpose(Image.Transpose.ROTATE_270)
        rows.append((put(f"mismatch_{index:04d}.jpg", _jpeg(mirrored)), other.caption(), "mismatched"))

    first = goods[0][2].rsplit("/", 1)[1]
    for code in (404, 500, 403):
        rows.append((f"{base_url}/status/{code}", f"a picture behind status {code}", f"http_{code}"))
    rows.append((f"{base_url}/stall", "a picture from a stalled host", "stall"))
    rows.append((f"{base_url}/drip", "a picture that drips one byte a second", "drip"))
    rows.append((f"{base_url}/html", "an html page pretending to be a picture", "html"))
    rows.append((f"{base_url}/redirect/2?to={first}", goods[0][0].caption() + " via redirects", "redirect_ok"))
    rows.append((f"{base_url}/loop-a", "a redirect loop never ends", "redirect_loop"))
    rows.append((f"{base_url}/redirect-out?port=9&to={first}", "a redirect to a forbidden host", "ssrf"))
    rows.append((f"{base_url}/noai/{first}", "a picture whose owner says noai", "noai"))
    rows.append((f"{base_url}/private/{first}", "a picture in a folder robots.txt disallows", "robots"))
    rows.append((f"{base_url}/reserved/{first}", "a picture whose site reserves text and data mining", "tdm_file"))
    rows.append((f"{base_url}/tdm/{first}", "a picture served with a tdm reservation header", "tdm_header"))
    rows.append((f"{base_url}/ai-pref/{first}", "a picture whose owner refuses AI training", "ai_usage"))
    rows.append((f"{base_url}/huge", "a picture with a two gigabyte body", "huge"))
    rows.append((f"{base_url}/flaky/503/demo?fail=1&to={first}", goods[0][0].caption() + " after one 503", "retry_ok"))
    truncated = _jpeg(goods[1][1])
    rows.append((put("truncated.jpg", truncated[: len(truncated) // 2]), "a truncated jpeg of a shape", "truncated"))
    rows.append((put("bomb.png", bomb_png()), "a decompression bomb disguised as a png", "bomb"))
    rows.append((put("tiny.png", _png(Image.new("RGB", (12, 12), (200, 10, 10)))), "a tiny red square icon", "tiny"))
    rows.append((put("blank.jpg", _jpeg(Image.new("RGB", (300, 300), (255, 255, 255)))), "a plain white picture here", "blank"))
    rows.append((put("thin.png", _png(Image.new("RGB", (1200, 60), (10, 200, 10)))), "a very thin green banner strip", "aspect"))
    rows.append((put("vector.svg", b'<svg xmlns="http://www.w3.org/2000/svg"><circle r="5"/></svg>'), "a vector circle drawing here", "svg"))
    rows.append((goods[2][2], "IMG_2187.jpg", "boilerplate"))
    rows.append((goods[3][2], "ok", "too_short"))
    rows.append(("", "a row without any url at all", "missing_url"))
    rows.append(("ftp://example.invalid/a.jpg", "a picture on an ftp server", "ftp"))
    rows.append(("javascript:alert(1)", "a script pretending to be a url", "javascript"))
    rows.append(("file:///etc/passwd", "a local file pretending to be a picture", "file"))
    rows.append(("http://localhost:9/secret.jpg", "a picture on a loopback host", "ssrf_loopback"))

    csv_path = root / "rows.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["url", "caption", "expect"])
        writer.writerows(rows)
        handle.write('http://[broken-host/x.jpg,"an unterminated quote\n')  # malformed last row
    return csv_path


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.demo")
    sub = parser.add_subparsers(dest="command", required=True)
    serve_cmd = sub.add_parser("serve")
    serve_cmd.add_argument("--root", required=True)
    serve_cmd.add_argument("--port", type=int, default=0)
    serve_cmd.add_argument("--port-file")
    serve_cmd.add_argument("--latency-ms", type=float, default=0.0)
    corpus_cmd = sub.add_parser("corpus")
    corpus_cmd.add_argument("--root", required=True)
    corpus_cmd.add_argument("--base-url", required=True)
    corpus_cmd.add_argument("--good", type=int, default=200)
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(Path(args.root), args.port, args.port_file, args.latency_ms)
    else:
        print(make_corpus(Path(args.root), args.base_url.rstrip("/"), args.good))
    return 0


if __name__ == "__main__":
    sys.exit(main())
