"""`cm-diffusers serve`: the real-time HTTP API for one consistency model: embedded (uvicorn, one process) by default,
or on Ray Serve (`--engine ray`: replicas, clusters)."""

import os
import signal
import sys
import threading

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def register(subparsers):
    parser = subparsers.add_parser(
        "serve", help="Serve a model over HTTP: /v1/generate, /v1/edit/{task}, /metrics, /docs.",
        description="Serves the model with dynamic batching, API keys, limits and Prometheus metrics, in this process "
                    "(--engine embedded, the default) or on Ray Serve (--engine ray: a local Ray instance, or "
                    "--address to join a cluster; replicas). Stop it with SIGTERM (kill PID) or Ctrl-C: /readyz "
                    "turns 503, new requests get 503 with Retry-After, requests in flight complete, then the port "
                    "closes; a second signal stops at once.")
    parser.add_argument("--engine", choices=("embedded", "ray"), default="embedded",
                        help="embedded (default): uvicorn and the model in this process, nothing else listening; "
                             "ray: Ray Serve (needed for --num_replicas > 1 and --address).")
    parser.add_argument("--ray_ports_beyond_loopback", action="store_true",
                        help="With --engine ray on a loopback --host: accept that Ray's own servers (GCS, raylet, "
                             "agents, workers) listen on all interfaces, which Ray 2.60 cannot confine; without it "
                             "such a server is refused, since it would open more than the loopback it promises.")
    parser.add_argument("--model", default="fashion-mnist-cd",
                        help="Pipeline folder, Hub repo id, or shipped short name (default: fashion-mnist-cd). A "
                             "latent text-to-image model (an LCM folder, or a teacher with --lora) is served with "
                             "prompts: /v1/generate takes a `prompt`.")
    parser.add_argument("--lora", default=None,
                        help="LCM-LoRA weights (folder or Hub repo id) for a text-to-image --model (their teacher), "
                             "sampled with LCMScheduler, as `cm-diffusers generate --lora` does.")
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
    parser.add_argument("--auth_failures_per_minute", type=float, default=30,
                        help="Failed authentications per minute per client address before it gets 429s for every "
                             "key (0 = unlimited).")
    parser.add_argument("--request_timeout_s", type=float, default=60,
                        help="Requests unanswered after this many seconds get a 503.")
    parser.add_argument("--drain_s", type=float, default=1.0,
                        help="On SIGTERM, answer 503 (and /readyz 503) for at least this long before the port closes, "
                             "so that load balancers stop sending first (default 1).")
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
        model=os.path.expanduser(args.model), model_name=args.model, text_to_image=args.text_to_image,
        lora=os.path.expanduser(args.lora) if args.lora else None,
        teacher=os.path.expanduser(args.teacher) if args.teacher else None, device=args.device, dtype=args.dtype,
        max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms,
        num_threads=max(1, int(args.num_cpus_per_replica)), api_key_hashes=[hash_key(key) for key in keys],
        limits=Limits(max_images=args.max_images, max_steps=args.max_steps,
                      max_teacher_steps=args.max_teacher_steps, rate_limit_per_minute=args.rate_limit,
                      auth_failures_per_minute=args.auth_failures_per_minute,
                      request_timeout_s=args.request_timeout_s),
        ui=args.ui,
    )


def _check_args(args):
    from ..shipped_models import resolve_pretrained

    for name in ("port", "num_replicas", "max_batch_size", "max_images", "max_steps", "max_teacher_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be a positive integer, got {getattr(args, name)}.")
    if args.num_cpus_per_replica <= 0 or args.batch_wait_ms < 0 or args.request_timeout_s <= 0 or args.rate_limit < 0 \
            or args.auth_failures_per_minute < 0 or args.drain_s < 0:
        raise ValueError("--num_cpus_per_replica and --request_timeout_s must be positive, --batch_wait_ms, "
                         "--rate_limit, --auth_failures_per_minute and --drain_s not negative.")
    model = resolve_pretrained(os.path.expanduser(args.model))
    looks_like_path = str(model).startswith(("/", ".", "~")) or str(model).count("/") > 1
    if looks_like_path and not os.path.isfile(os.path.join(model, "model_index.json")):
        raise FileNotFoundError(f"--model {args.model!r}: no pipeline folder there (model_index.json). Pass a "
                                "pipeline folder, a Hub repo id (org/name) or a shipped model (fashion-mnist-cd).")
    args.text_to_image = _is_text_to_image(model)
    if args.lora and not args.text_to_image:
        raise ValueError(f"--lora {args.lora!r}: LCM-LoRA weights go with a text-to-image --model (their teacher, "
                         f"with a text encoder and tokenizer); {args.model!r} has none.")
    if args.text_to_image and args.teacher:
        raise ValueError("--teacher compares a pixel consistency model with its diffusion teacher; a text-to-image "
                         "model is served without one.")
    if args.text_to_image:
        from ..latent.text_to_image import check_text_to_image

        check_text_to_image(model, args.lora)  # before any weights load: a teacher without --lora, a missing LoRA
    if args.teacher:
        teacher = resolve_pretrained(os.path.expanduser(args.teacher))
        looks_like_path = str(teacher).startswith(("/", ".", "~")) or str(teacher).count("/") > 1
        if looks_like_path and not os.path.isfile(os.path.join(teacher, "unet", "config.json")):
            raise FileNotFoundError(f"--teacher {args.teacher!r}: no diffusion model folder there "
                                    "(unet/config.json). Pass a diffusers folder, a Hub repo id or a shipped "
                                    "teacher (fashion-mnist-ddpm).")


def _is_text_to_image(model: str) -> bool:
    """Whether `model` is served with prompts (its model_index.json names a text encoder and a tokenizer)."""
    from ..latent.text_to_image import is_text_to_image

    try:
        return is_text_to_image(model)
    except OSError as error:  # a Hub id not in the cache (offline), an unreadable folder
        raise ValueError(f"--model {model!r}: could not read its model_index.json to tell a pixel model from a "
                         f"text-to-image one ({error}).") from error


def run(args) -> int:
    _check_args(args)
    if args.engine == "embedded" and (args.address or args.num_replicas != 1):
        raise ValueError("--address and --num_replicas need Ray Serve: add --engine ray.")
    if args.engine == "ray" and args.address is None and args.host in LOOPBACK and not args.ray_ports_beyond_loopback:
        raise ValueError(f"--engine ray with --host {args.host}: Ray 2.60's own servers would listen on all "
                         "interfaces, beyond the loopback the API promises. Use the default --engine embedded (it "
                         "opens only the API's port), or firewall this machine and pass --ray_ports_beyond_loopback.")
    try:
        import torch
        import uvicorn  # noqa: F401
    except ImportError:
        raise ValueError("Serving needs the serve extra: pip install 'cm_diffusers[serve]'.") from None
    from ..serving.schemas import load_api_keys

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    keys = load_api_keys(args.api_key_file)
    args.host, note = bind_host(args.host, keys)
    if note:
        print(f"cm-diffusers serve: {note}", file=sys.stderr)
    settings = build_settings(args, keys)
    return _run_embedded(args, settings) if args.engine == "embedded" else _run_ray(args, settings)


def _ready_line(args) -> str:
    url = f"http://{args.host}:{args.port}"
    teacher = f", teacher {args.teacher}" if args.teacher else f", LCM-LoRA {args.lora}" if args.lora else ""
    return (f"cm-diffusers serve: ready at {url} (model {args.model}{teacher}, {args.engine} engine, "
            f"{args.num_replicas} replica(s), max batch {args.max_batch_size}; API docs at {url}/docs"
            f"{', playground at ' + url + '/ui' if args.ui else ''})")


def _run_embedded(args, settings) -> int:
    import asyncio

    from ..serving.embedded import build_server

    server = build_server(settings, args.host, args.port, drain_s=args.drain_s)

    async def serve():
        task = asyncio.get_running_loop().create_task(server.serve())
        while not server.started and not task.done():
            await asyncio.sleep(0.05)
        if server.started:
            print(_ready_line(args), flush=True)
        await task

    asyncio.run(serve())
    if not server.started:
        raise ValueError(f"could not listen on {args.host}:{args.port} (in use?).")
    print("cm-diffusers serve: stopped", flush=True)
    return 0


def _run_ray(args, settings) -> int:
    try:
        import ray
        from ray import serve
    except ImportError:
        raise ValueError("--engine ray needs Ray Serve: pip install 'cm_diffusers[serve]'.") from None
    from ..serving.deployment import APP_NAME, build_application, drain_application, ray_init_options

    actor_options = {"num_cpus": args.num_cpus_per_replica}
    if settings.device.startswith("cuda"):
        actor_options["num_gpus"] = 1

    local = args.address is None
    if local:
        num_cpus = max(os.cpu_count() or 1, int(args.num_replicas * args.num_cpus_per_replica + 0.999))
        ray.init(**ray_init_options(args.host, num_cpus))
        if args.host in LOOPBACK:
            print("cm-diffusers serve: warning: with --engine ray, Ray's own servers (GCS, raylet, agents, workers, "
                  "replicas) listen on all interfaces whatever --host says (Ray 2.60 has no option to confine them); "
                  "firewall this machine, or use the default --engine embedded, which opens only the API's port.",
                  file=sys.stderr, flush=True)
    else:
        ray.init(address=args.address, logging_level="warning")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        app = build_application(settings, num_replicas=args.num_replicas, ray_actor_options=actor_options)
        serve.run(app, name=APP_NAME, route_prefix="/")
        print(_ready_line(args), flush=True)
        if not local:
            print(f"cm-diffusers serve: deployed onto the Ray cluster at {args.address} as application {APP_NAME!r}; "
                  f"remove it with `serve shutdown` or `serve delete {APP_NAME}`.", flush=True)
            return 0
        while not stop.wait(0.5):
            pass
        print("cm-diffusers serve: draining (requests in flight complete first)", flush=True)
        # The ingress answers 503 JSON (and /readyz 503) from now on; once nothing is in flight, Ray stops with its
        # proxy, which closes the port. Deleting the application first would leave the proxy answering 404 meanwhile.
        drain_application(args.drain_s, settings.limits.request_timeout_s + 5)
        return 0
    except RuntimeError as error:
        raise ValueError(f"the deployment failed to start: {str(error).splitlines()[0]}") from None
    finally:
        if local:
            ray.shutdown()
