"""Serving: the real-time HTTP API of `cm-diffusers serve` (FastAPI; embedded or on Ray Serve) and its Python client.

- `schemas`: pydantic request/response models (one per edit task), settings and limits (the API's boundary).
- `model`: the model deployment, which loads the pipeline and batches forward passes across requests.
- `middleware`: one plain ASGI middleware (request id, draining, API keys, rate limits, body size, metrics, log).
- `app`: the FastAPI app (routes and errors).
- `embedded`: the default engine: uvicorn, the app and the model in one process.
- `deployment`: the Ray Serve application (ingress + model) and the builder for `serve deploy` config files.
- `client`: `Client(url, api_key)`, which needs only `requests`.
- `playground`: the /ui page (optional).
- `local`: `LocalServer`, a server as a child process on loopback (tests, benchmarks, scripts).

Importing this package needs neither Ray nor gradio; `from cm_diffusers.serving import Client` needs `requests`.
"""

from .client import APIError, Client

__all__ = ["APIError", "Client"]
