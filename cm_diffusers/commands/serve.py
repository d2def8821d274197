"""`cm-diffusers serve`: the real-time HTTP API (Ray Serve + FastAPI) for one consistency model."""

import os
import signal
import sys
import threading

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def register(subparsers):
    parser = subparsers.add_parser(
        "serve", help="Serve a model over HTTP (Ray Serve): /v1/generate, /v1/edit/{task}, /metrics, /docs.",
        description="Starts a local Ray instance (or joins --address) and serves the model with dynamic batching, "
                    "API keys, limits and Prometheus metrics. Stop it with SIGTERM to this process (kill PID): "
                    "requests in flight complete first. Ctrl-C in a terminal also reaches Ray's own processes and "
                    "stops at once.")
    parser.add_argument("--model", default="fashion-mnist-cd",
                        help="Pipeline folder, Hub repo id, or shipped short name (default: fashion-mnist-cd).")
    parser.add_argument("--teacher", default=None,
                        help="Also serve a diffusion teacher (folder, Hub repo id or shipped short name, e.g. "
                             "fashion-mnist-edm or fashion-mnist-ddpm) at /v1/teacher/generate, for comparisons (the "
                             "playground's Compare tab); it must have the model's shape and classes.")
    parser.add_argument("--host", default="127.0.0.1",
                        help="Address to listen on; without an API key the server always binds to 127.0.0.1.")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port.")
    parser.add_argument("--num_replicas", type=int, default=1, help="Model replicas (each loads the weights).")
    parser.add_argument("--num_cpus_per_replica", type=float, default=1,
                        help="CPUs Ray reserves per model replica; also its torch threads (default 1).")
    parser.add_argument("--max_batch_size", type=int, default=32, help="Images per batched forward pass.")
    parser.add_argument("--batch_wait_ms", type=float, default=5.0,
                        help="How long a batch waits for more requests before it runs.")
    parser.add_argument("--api_key_file", default=None,
                        help="File with one API key per line (also: CM_DIFFUSERS_API_KEYS=key1,key2).")
    parser.add_argument("--address", default=None,
                        help="Ray cluster address (e.g. ray://head:10001 or auto) to deploy onto; default: start a "
                             "local Ray instance for this process.")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available).")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                        help="Weights and compute dtype.")
    parser.add_argument("--max_images", type=int, default=64, help="Images per request.")
    parser.add_argument("--max_steps", type=int, default=40, help="Network evaluations per request.")
    parser.add_argument("--max_teacher_steps", type=int, default=50,
                        help="Heun steps per /v1/teacher/generate request (2n - 1 network evaluations).")
    parser.add_argument("--rate_limit", type=float, default=600,
                        help="Requests per minute per API key (0 = unlimited).")
    parser.add_argument("--request_timeout_s", type=float, default=60,
                        help="Requests unanswered after this many seconds get a 503.")
    parser.add_argument("--ui", action="store_true", help="Also serve the playground page at /ui.")
    parser.set_defaults(func=run)


def bind_host(host: str, keys: list) -> tuple:
    """(the address to listen on, a note for the user): without an API key, only the loopback interface."""
    if keys:
        return host, None
    if host not in LOOPBACK:
        return "127.0.0.1", (f"no API key configured (--api_key_file or CM_DIFFUSERS_API_KEYS): listening on "
                             f"127.0.0.1 only, not {host}.")
    return host, "no API key configured: the API is open to local users, and listens on 127.0.0.1 only."


def build_settings(args, keys):
    from ..serving.schemas import Limits, ServerSettings, hash_key

    return ServerSettings(
        model=os.path.expanduser(args.model), model_name=args.model,
        teacher=os.path.expanduser(args.teacher) if args.teacher else None, device=args.device, dtype=args.dtype,
        max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms,
        num_threads=max(1, int(args.num_cpus_per_replica)), api_key_hashes=[hash_key(key) for key in keys],
        limits=Limits(max_images=args.max_images, max_steps=args.max_steps,
                      max_teacher_steps=args.max_teacher_steps, rate_limit_per_minute=args.rate_limit,
                      request_timeout_s=args.request_timeout_s),
        ui=args.ui,
    )


def _check_args(args):
    from ..shipped_models import resolve_pretrained

    for name in ("port", "num_replicas", "max_batch_size", "max_images", "max_steps", "max_teacher_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be a positive integer, got {getattr(args, name)}.")
    if args.num_cpus_per_replica <= 0 or args.batch_wait_ms < 0 or args.request_timeout_s <= 0 or args.rate_limit < 0:
        raise ValueError("--num_cpus_per_replica and --request_timeout_s must be positive, --batch_wait_ms and "
                         "--rate_limit not negative.")
    model = resolve_pretrained(os.path.expanduser(args.model))
    looks_like_path = str(model).startswith(("/", ".", "~")) or str(model).count("/") > 1
    if looks_like_path and not os.path.isfile(os.path.join(model, "model_index.json")):
        raise FileNotFoundError(f"--model {args.model!r}: no pipeline folder there (model_index.json). Pass a "
                                "pipeline folder, a Hub repo id (org/name) or a shipped model (fashion-mnist-cd).")
    if args.teacher:
        teacher = resolve_pretrained(os.path.expanduser(args.teacher))
        looks_like_path = str(teacher).startswith(("/", ".", "~")) or str(teacher).count("/") > 1
        if looks_like_path and not os.path.isfile(os.path.join(teacher, "unet", "config.json")):
            raise FileNotFoundError(f"--teacher {args.teacher!r}: no diffusion model folder there "
                                    "(unet/config.json). Pass a diffusers folder, a Hub repo id or a shipped "
                                    "teacher (fashion-mnist-ddpm).")


def run(args) -> int:
    _check_args(args)
    try:
        import ray
        from ray import serve
    except ImportError:
        raise ValueError("Serving needs Ray Serve: pip install 'cm_diffusers[serve]'.") from None
    import torch

    from ..serving.deployment import APP_NAME, build_application
    from ..serving.schemas import load_api_keys

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    keys = load_api_keys(args.api_key_file)
    args.host, note = bind_host(args.host, keys)
    if note:
        print(f"cm-diffusers serve: {note}", file=sys.stderr)
    settings = build_settings(args, keys)
    actor_options = {"num_cpus": args.num_cpus_per_replica}
    if settings.device.startswith("cuda"):
        actor_options["num_gpus"] = 1

    local = args.address is None
    if local:
        num_cpus = max(os.cpu_count() or 1, int(args.num_replicas * args.num_cpus_per_replica + 0.999))
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level="warning")
    else:
        ray.init(address=args.address, logging_level="warning")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        app = build_application(settings, num_replicas=args.num_replicas, ray_actor_options=actor_options)
        serve.run(app, name=APP_NAME, route_prefix="/")
        url = f"http://{args.host}:{args.port}"
        teacher = f", teacher {args.teacher}" if args.teacher else ""
        print(f"cm-diffusers serve: ready at {url} (model {args.model}{teacher}, {args.num_replicas} replica(s), "
              f"max batch {args.max_batch_size}; API docs at {url}/docs"
              f"{', playground at ' + url + '/ui' if args.ui else ''})",
              flush=True)
        if not local:
            print(f"cm-diffusers serve: deployed onto the Ray cluster at {args.address} as application {APP_NAME!r}; "
                  f"remove it with `serve shutdown` or `serve delete {APP_NAME}`.", flush=True)
            return 0
        while not stop.wait(0.5):
            pass
        print("cm-diffusers serve: shutting down (requests in flight complete first)", flush=True)
        # Deleting the application first lets its replicas finish the requests they hold while the HTTP proxy is
        # still up to deliver the answers; serve.shutdown() alone can stop the proxy under them.
        serve.delete(APP_NAME)
        serve.shutdown()
        return 0
    except RuntimeError as error:
        raise ValueError(f"the deployment failed to start: {str(error).splitlines()[0]}") from None
    finally:
        if local:
            ray.shutdown()
