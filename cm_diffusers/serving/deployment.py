"""The Ray Serve application: a FastAPI ingress (`APIIngress`) in front of the model deployment (`ConsistencyModel`,
or `TextToImageModel` for a text-to-image model).

`build_application(settings, ...)` is what `cm-diffusers serve` runs; `app_builder(args)` is the entry point of a
Ray Serve config file (`serve deploy deploy/serve_config.yaml`). The ingress needs no CPU of its own and scales
separately from the model replicas, which hold the weights (`ray_actor_options` sets their CPUs/GPUs).
"""

from ray import serve
from ray.exceptions import RayError, RayTaskError
from ray.serve.exceptions import RayServeException

from .app import BackendUnavailable, create_app
from .middleware import REQUEST_ID_PATTERN, ServerState
from .schemas import Limits, ServerSettings, hash_key, load_api_keys
from .text_to_image import model_class

APP_NAME = "cm-diffusers"
MODEL_DEPLOYMENT = "ConsistencyModel"
INGRESS_DEPLOYMENT = "APIIngress"


class HandleBackend:
    """The model deployment seen through a Ray Serve handle; failures of Ray itself become `BackendUnavailable`."""

    def __init__(self, handle):
        self.handle = handle

    async def _call(self, method: str, *args):
        try:
            return await getattr(self.handle, method).remote(*args)
        except RayTaskError:
            raise  # a bug in the model code: a 500, logged with the request id
        except (RayError, RayServeException) as error:  # replica died or restarting, back-pressure, cancelled
            raise BackendUnavailable(type(error).__name__) from error

    async def generate(self, request: dict, key=None) -> dict:
        return await self._call("generate", request, key)

    async def teacher_generate(self, request: dict, key=None) -> dict:
        return await self._call("teacher_generate", request, key)

    async def edit(self, task, image, mask, options, key=None) -> dict:
        return await self._call("edit", task, image, mask, options, key)

    async def stats(self) -> dict:
        return await self._call("stats")

    async def info(self) -> dict:
        return await self._call("info")

    async def ready(self) -> bool:
        return await self._call("ready")


@serve.ingress()
class APIIngress:
    """The HTTP entry point: builds the FastAPI app of `app.py` on each ingress replica."""

    def __init__(self, model_handle, settings: dict):
        self.backend = HandleBackend(model_handle)
        self.settings = ServerSettings(**settings)
        self.state = ServerState()

    def __serve_build_asgi_app__(self):
        return create_app(self.backend, self.settings, echo_request_id=False, state=self.state)

    def drain(self) -> int:
        """From now on /readyz answers 503 and new /v1 requests 503 JSON with Retry-After; returns the requests in
        flight."""
        self.state.draining = True
        return self.state.busy


class RequestIdGuard:
    """ASGI middleware of Ray's HTTP proxy (outside its own request-id middleware): an `X-Request-ID` that is not
    printable ASCII without spaces (1-128 characters) is dropped, so that the proxy gives the request a new id, which
    the response header, the error body and the access log then all carry."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = scope["headers"]
            kept = [(name, value) for name, value in headers
                    if name.lower() != b"x-request-id" or REQUEST_ID_PATTERN.match(value.decode("latin-1"))]
            if len(kept) != len(headers):
                scope = dict(scope, headers=kept)
        await self.app(scope, receive, send)


PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "cm_diffusers.serving.deployment:proxy_middlewares"


def proxy_middlewares() -> list:
    """The middlewares of Ray's HTTP proxy (Ray calls this, in the proxy process, when the environment variable
    RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH names it; `serve --engine ray` sets it for its local Ray instance)."""
    from starlette.middleware import Middleware

    return [Middleware(RequestIdGuard)]


def build_application(settings: ServerSettings, num_replicas: int = 1, ray_actor_options: dict | None = None,
                      autoscaling_config: dict | None = None, ingress_replicas: int = 1):
    """The bound Serve application for `serve.run`: `num_replicas` model replicas (or an autoscaling range)."""
    # Requests in flight per model replica: a full batch waiting behind the running one, plus room for edits. Past
    # that, at most max(64, 4 batches) wait at each caller; more get an immediate 503 with Retry-After rather than a
    # place in a backlog that only grows (after a replica crash, an unbounded backlog kept the restarted replica
    # behind for minutes in the fault run of benchmarks/serve_load.py).
    model_options = {
        "name": MODEL_DEPLOYMENT, "ray_actor_options": ray_actor_options or {"num_cpus": 1},
        "max_ongoing_requests": 2 * settings.max_batch_size + 8,
        "max_queued_requests": max(64, 4 * settings.max_batch_size),
        "graceful_shutdown_timeout_s": 30,
        "health_check_period_s": 2, "health_check_timeout_s": 30,
    }
    if autoscaling_config:
        model_options["autoscaling_config"] = autoscaling_config
    else:
        model_options["num_replicas"] = num_replicas
    model = serve.deployment(model_class(settings)).options(**model_options)
    ingress = serve.deployment(APIIngress).options(
        name=INGRESS_DEPLOYMENT, num_replicas=ingress_replicas, ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=1000, graceful_shutdown_timeout_s=30)
    dumped = settings.model_dump()
    return ingress.bind(model.bind(dumped), dumped)


def app_builder(args: dict):
    """Entry point of a Serve config file: `import_path: cm_diffusers.serving.deployment:app_builder`.

    `args` takes the `ServerSettings` fields (model, teacher, device, dtype, max_batch_size, batch_wait_ms,
    num_threads, ui, limits; `text_to_image: true` and `lora` for a latent text-to-image model) and `api_key_file`;
    keys also come from CM_DIFFUSERS_API_KEYS (set it in the runtime_env), and are required unless
    `allow_no_api_key: true`. Replicas, CPUs/GPUs and autoscaling are set per
    deployment in the config file's `deployments:` section.
    """
    args = dict(args or {})
    keys = load_api_keys(args.pop("api_key_file", None))
    if not keys and not args.pop("allow_no_api_key", False):
        raise ValueError("No API key configured: a cluster deployment is reachable from the network. Set "
                         "CM_DIFFUSERS_API_KEYS in the runtime_env or `api_key_file` in args (or, on a private "
                         "network only, `allow_no_api_key: true`).")
    args.pop("allow_no_api_key", None)
    limits = Limits(**args.pop("limits", {}) or {})
    settings = ServerSettings(**args, limits=limits, api_key_hashes=[hash_key(key) for key in keys])
    return build_application(settings)


def drain_application(drain_s: float, timeout_s: float):
    """Drains every ingress replica of the application (see `APIIngress.drain`) and waits, at least `drain_s` and at
    most `timeout_s` seconds, until none has a request in flight."""
    import time

    handle = serve.get_deployment_handle(INGRESS_DEPLOYMENT, APP_NAME)
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        busy = handle.drain.remote().result()  # one replica per call: with several, repeat until all are idle
        if not busy and time.monotonic() - started >= drain_s:
            return
        time.sleep(0.05)


def ray_init_options(host: str, num_cpus: int) -> dict:
    """`ray.init` arguments of the local Ray instance of `serve --engine ray`: with a loopback API, its node address is
    127.0.0.1 (what Ray advertises and connects to; its gRPC servers and agents still bind to all interfaces, which Ray
    2.60 cannot change), and no dashboard is started; the HTTP proxy gets `proxy_middlewares`."""
    import os

    os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)  # inherited by the Ray processes started here
    options = {"address": "local", "num_cpus": num_cpus, "include_dashboard": False, "logging_level": "warning"}
    if host in ("127.0.0.1", "localhost", "::1"):
        options["_node_ip_address"] = "127.0.0.1"
    return options
