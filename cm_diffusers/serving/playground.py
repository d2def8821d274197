"""The web playground: one static HTML/JS page (no build step, no Gradio) that talks to the HTTP API.

`mount_playground(app)` adds `/ui` (the page) and `/ui/samples/*.png` (sample images for the Edit tab) to a FastAPI
app; `cm-diffusers serve --ui` calls it on the API's own app, so the page and `/v1/...` share one origin.
`proxy_app(api_url)` is the stand-alone variant used by `cm-diffusers playground --api_url URL`: it serves the page
and forwards `/v1/*`, `/healthz` and `/readyz` to an API that runs elsewhere, so the browser needs no CORS.

Why not Gradio (checked with gradio 6.31 and ray[serve] 2.60): Gradio's queue keeps each event in the memory of
the replica that received it, and Ray Serve's proxy has no sticky sessions, so with `--num_replicas 2` about one
call in five failed (the `queue/join` and `queue/data` requests reached different replicas); a FastAPI app with a
Gradio app mounted cannot be pickled into `@serve.ingress(app)`; and gradio pins pillow<13.
"""

import json
import os

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
PAGE = "playground.html"
PROXIED_PREFIXES = ("/v1/", "/healthz", "/readyz")
# Headers a proxy must not copy from one hop to the next (RFC 9110, section 7.6.1), plus those it recomputes.
_HOP_HEADERS = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                "transfer-encoding", "upgrade", "host", "content-length", "content-encoding"}


def _static_path(*parts: str) -> str:
    return os.path.join(STATIC_DIR, *parts)


def sample_names() -> list:
    """Sample images of the Edit tab (Fashion-MNIST test images, 28x28 grayscale)."""
    folder = _static_path("samples")
    return sorted(name for name in os.listdir(folder) if name.endswith(".png")) if os.path.isdir(folder) else []


def render_page(api_base: str = "") -> str:
    """The page with the API's base URL ("" = same origin) and the sample list filled in."""
    if api_base and not api_base.startswith(("http://", "https://", "/")):
        raise ValueError(f"api_base must be empty, a path starting with '/' or an http(s) URL, got {api_base!r}.")
    with open(_static_path(PAGE), encoding="utf-8") as handle:
        page = handle.read()
    # json.dumps gives a JS string literal; "</" is escaped so that no value can close the <script> element.
    api_literal = json.dumps(api_base.rstrip("/")).replace("</", "<\\/")
    samples_literal = json.dumps(sample_names()).replace("</", "<\\/")
    return page.replace("__API_BASE__", api_literal).replace("__SAMPLES__", samples_literal)


def mount_playground(app, api_base: str = ""):
    """Add the playground to a FastAPI app: `GET /ui` (the page) and `GET /ui/samples/{name}` (sample images).

    Args:
        app (`fastapi.FastAPI`): the app to extend, usually the API's own ingress app.
        api_base (`str`, defaults to `""`): where the page sends `/v1/...` requests; `""` means the same origin.

    The routes need no API key: the page asks the user for one and sends it as `Authorization: Bearer KEY`.
    Returns the app.
    """
    from fastapi import HTTPException
    from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse

    page = render_page(api_base)  # read once: a missing asset fails at start-up, not at the first visit
    samples = set(sample_names())

    @app.get("/ui", include_in_schema=False)
    def playground_root():
        # The page loads its samples with relative URLs, so it must live at /ui/ (with the slash).
        return RedirectResponse(url="ui/", status_code=307)

    @app.get("/ui/", response_class=HTMLResponse, include_in_schema=False)
    def playground_page():
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    @app.get("/ui/samples/{name}", include_in_schema=False)
    def playground_sample(name: str):
        if name not in samples:  # a fixed list: no path from the request ever reaches the file system
            raise HTTPException(status_code=404, detail=f"No sample image named {name!r}.")
        return FileResponse(_static_path("samples", name), media_type="image/png",
                            headers={"Cache-Control": "max-age=3600"})

    return app


def proxy_app(api_url: str, timeout_s: float = 120.0):
    """A FastAPI app that serves the playground and forwards the API's routes to `api_url` (stand-alone mode)."""
    from urllib import request as urllib_request
    from urllib.error import HTTPError, URLError

    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse, Response

    if not api_url.startswith(("http://", "https://")):
        raise ValueError(f"--api_url must be an http(s) URL such as http://127.0.0.1:8000, got {api_url!r}.")
    api_url = api_url.rstrip("/")
    app = FastAPI(title="cm_diffusers playground", docs_url=None, redoc_url=None, openapi_url=None)
    mount_playground(app)

    def forward(method: str, path: str, query: str, headers: dict, body: bytes):
        url = api_url + path + (f"?{query}" if query else "")
        outgoing = urllib_request.Request(url, data=body or None, method=method, headers=headers)
        try:
            with urllib_request.urlopen(outgoing, timeout=timeout_s) as response:
                return response.status, dict(response.headers), response.read()
        except HTTPError as error:  # 4xx/5xx from the API: pass its JSON body through unchanged
            return error.code, dict(error.headers), error.read()

    @app.api_route("/{path:path}", methods=["GET", "POST"], include_in_schema=False)
    async def proxy(path: str, request: Request):
        path = "/" + path
        if not path.startswith(PROXIED_PREFIXES):
            return JSONResponse({"detail": f"Not found: {path}"}, status_code=404)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        body = await request.body()
        try:
            status, response_headers, content = await run_in_threadpool(
                forward, request.method, path, request.url.query, headers, body)
        except (URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            return JSONResponse({"detail": f"The API at {api_url} is not reachable ({reason})."}, status_code=502)
        kept = {k: v for k, v in response_headers.items() if k.lower() not in _HOP_HEADERS}
        return Response(content=content, status_code=status, headers=kept)
    return app
