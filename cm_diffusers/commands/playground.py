"""`cm-diffusers playground`: the web playground on its own: with the API in-process, or in front of a running API."""

import sys


def register(subparsers):
    parser = subparsers.add_parser(
        "playground", help="Open the web playground (generate, compare, edit in the browser) at /ui.",
        description="Without --api_url: starts the HTTP API for --model (as `cm-diffusers serve --ui` does) and "
                    "serves the playground at /ui on the same port. With --api_url: serves only the page, and "
                    "forwards its /v1/... requests to the API at that URL (so the browser needs no CORS).")
    parser.add_argument("--model", default="fashion-mnist-cd",
                        help="Pipeline folder, Hub repo id, or shipped short name (default: fashion-mnist-cd); "
                             "ignored with --api_url, where the API's own model is used.")
    parser.add_argument("--host", default="127.0.0.1", help="Address to listen on.")
    parser.add_argument("--port", type=int, default=7860, help="HTTP port of the page (default 7860).")
    parser.add_argument("--api_url", default=None,
                        help="URL of a running `cm-diffusers serve` API, e.g. http://127.0.0.1:8000; default: start "
                             "the API in this process.")
    parser.add_argument("--api_key_file", default=None,
                        help="Without --api_url: API keys of the API started here (one per line); the page asks "
                             "for one. With --api_url the page sends the key you type to that API.")
    parser.add_argument("--teacher", default=None,
                        help="Without --api_url: also serve this diffusion teacher (e.g. fashion-mnist-ddpm), so that "
                             "the Compare tab shows it next to the consistency model.")
    parser.add_argument("--device", default=None, help="Without --api_url: cpu or cuda (default: cuda if available).")
    parser.set_defaults(func=run)


def run(args) -> int:
    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port must be between 1 and 65535, got {args.port}.")
    if args.api_url is None:
        return _serve_with_ui(args)
    try:
        import uvicorn

        from ..serving.playground import proxy_app
    except ImportError:
        raise ValueError("The playground needs FastAPI and uvicorn: pip install 'cm_diffusers[serve]'.") from None
    app = proxy_app(args.api_url)
    if args.model != "fashion-mnist-cd":
        print(f"cm-diffusers playground: --model {args.model!r} is ignored with --api_url; the page uses the API's "
              "model.", file=sys.stderr)
    print(f"cm-diffusers playground: http://{args.host}:{args.port}/ui (API at {args.api_url.rstrip('/')})",
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def _serve_with_ui(args) -> int:
    """The same server as `cm-diffusers serve --ui`, so that the page talks to the real API on one origin."""
    from ..cli import build_parser

    argv = ["serve", "--model", args.model, "--host", args.host, "--port", str(args.port), "--ui"]
    if args.api_key_file:
        argv += ["--api_key_file", args.api_key_file]
    if args.teacher:
        argv += ["--teacher", args.teacher]
    if args.device:
        argv += ["--device", args.device]
    serve_args = build_parser().parse_args(argv)
    return serve_args.func(serve_args)
