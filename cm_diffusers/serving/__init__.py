"""Serving: the real-time HTTP API of `cm-diffusers serve` (Ray Serve + FastAPI) and its Python client.

- `schemas`: pydantic request/response models, settings and limits (the API's boundary).
- `model`: the model deployment, which loads the pipeline and batches requests (`@serve.batch`).
- `app`: the FastAPI app (routes, API keys, limits, errors, metrics, access log).
- `deployment`: the Ray Serve application (ingress + model) and the builder for `serve deploy` config files.
- `client`: `Client(url, api_key)`, which needs only `requests`.
- `playground`: the /ui page (optional).
- `local`: `LocalServer`, a server as a child process on loopback (tests, benchmarks, scripts).

Importing this package needs neither Ray nor gradio; `from cm_diffusers.serving import Client` needs `requests`.
"""

from .client import APIError, Client

__all__ = ["APIError", "Client"]
