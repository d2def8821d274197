"""The embedded engine, the default of `cm-diffusers serve`: uvicorn, the same FastAPI app (`app.py`) and the same
model class with its batcher (`model.py`) in one process, without Ray: one hop from the socket to the model, started in
seconds, and nothing listening but the API's own port. Ray Serve (`--engine ray`, `deployment.py`) adds replicas,
clusters and autoscaling.

On SIGTERM or SIGINT the server drains: `/readyz` answers 503 and new `/v1` requests get 503 JSON with Retry-After,
while the requests in flight finish; then the port closes. A second signal stops at once.
"""

import asyncio
import time

import uvicorn

from .app import create_app
from .middleware import ServerState
from .schemas import ServerSettings
from .text_to_image import model_class


class LocalBackend:
    """The model deployment called in this process (the `backend` of `create_app`)."""

    def __init__(self, model):
        self.model = model

    async def generate(self, request: dict, key=None) -> dict:
        return await self.model.generate(request, key)

    async def teacher_generate(self, request: dict, key=None) -> dict:
        return await self.model.teacher_generate(request, key)

    async def edit(self, task, image, mask, options, key=None) -> dict:
        return await self.model.edit(task, image, mask, options, key)

    async def info(self) -> dict:
        return self.model.info()

    async def ready(self) -> bool:
        return True

    async def stats(self) -> dict:
        return self.model.stats()


def build_server(settings: ServerSettings, host: str, port: int, drain_s: float = 1.0) -> "DrainingServer":
    """A uvicorn server over the API app; loads the model (and the teacher) first."""
    state = ServerState()
    app = create_app(LocalBackend(model_class(settings)(settings.model_dump())), settings, state=state)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=int(settings.limits.request_timeout_s) + 5,
                            timeout_keep_alive=5)
    return DrainingServer(config, state, drain_s)


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose first SIGTERM/SIGINT drains (see the module docstring): the port closes once no request
    is in flight and at least `drain_s` seconds have passed, so that load balancers see /readyz turn 503 first."""

    def __init__(self, config, state: ServerState, drain_s: float):
        super().__init__(config)
        self.state, self.drain_s, self.loop = state, drain_s, None

    def handle_exit(self, sig, frame):
        if self.state.draining or self.loop is None:  # a second signal (or none can drain): stop now
            return super().handle_exit(sig, frame)
        self.state.draining = True
        self.loop.call_soon_threadsafe(lambda: self.loop.create_task(self._drain()))

    async def _drain(self):
        started = time.monotonic()
        limit = self.config.timeout_graceful_shutdown or 60
        while (self.state.busy or time.monotonic() - started < self.drain_s) and time.monotonic() - started < limit:
            await asyncio.sleep(0.05)
        self.should_exit = True

    async def serve(self, sockets=None):
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)
