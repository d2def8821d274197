"""`Client(url, api_key)`: the Python client of `cm-diffusers serve`, returning PIL images."""

import base64
import io

import PIL.Image


class APIError(Exception):
    """An error answer of the server: HTTP `status`, error `type`, the `field` it names (if any), `request_id`, and
    `retry_after` (seconds as an int, when the server said when to retry)."""

    def __init__(self, status: int, kind: str, message: str, field=None, request_id=None, retry_after=None):
        super().__init__(f"{status} {kind}: {message}" + (f" (request {request_id})" if request_id else ""))
        self.status, self.kind, self.message, self.field = status, kind, message, field
        self.request_id, self.retry_after = request_id, retry_after


class Client:
    """
    Client of the HTTP API of `cm-diffusers serve`.

    Example:
        >>> client = Client("http://127.0.0.1:8000", api_key="...")
        >>> images = client.generate(num_images=4, seed=0)          # list of PIL images
        >>> shirts = client.generate(num_images=2, prompt="a shirt", seed=0)   # a text-to-image model
        >>> fixed = client.edit("inpaint", images[0], mask=mask, seed=0)
        >>> client.last_response["nfe"], client.last_response["latency_ms"]

    Args:
        url (`str`): Base URL of the server.
        api_key (`str`, *optional*): Sent as `Authorization: Bearer KEY`.
        timeout (`float`, defaults to 120): Seconds to wait for an answer.
    """

    def __init__(self, url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 120.0):
        import requests

        self.url = url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"
        self.last_response = None

    def _request(self, method: str, path: str, **kwargs) -> dict:
        response = self.session.request(method, self.url + path, timeout=self.timeout, **kwargs)
        try:
            body = response.json()
        except ValueError:
            body = {}
        if response.status_code >= 400:
            error = body.get("error") if isinstance(body.get("error"), dict) else {}
            retry_after = response.headers.get("Retry-After", "")
            raise APIError(response.status_code, error.get("type", "http_error"), error.get("message", response.text),
                           error.get("field"), response.headers.get("X-Request-ID"),
                           int(retry_after) if retry_after.isdigit() else None)
        return body

    def _images(self, body: dict) -> list:
        self.last_response = {key: value for key, value in body.items() if key != "images"}
        images = [PIL.Image.open(io.BytesIO(base64.b64decode(data))) for data in body["images"]]
        for image in images:
            image.load()
        return images

    def generate(self, num_images: int = 1, num_inference_steps: int | None = None, timesteps=None, sigmas=None,
                 seed: int | None = None, class_labels=None, output_format: str = "png", prompt=None,
                 guidance_scale: float | None = None) -> list:
        """Generates images (`POST /v1/generate`); with a seed, the same images as `ConsistencyPipeline` gives (or, for
        a text-to-image model, `latent.text_to_image.generate`). `prompt` (one, or a list with one per image) and
        `guidance_scale` are for text-to-image models; options left as None take the server's defaults."""
        payload = {"num_images": num_images, "num_inference_steps": num_inference_steps, "timesteps": timesteps,
                   "sigmas": sigmas, "seed": seed, "class_labels": class_labels, "output_format": output_format,
                   "prompt": prompt, "guidance_scale": guidance_scale}
        payload = {key: value for key, value in payload.items() if value is not None}
        return self._images(self._request("POST", "/v1/generate", json=payload))

    def edit(self, task: str, image, mask=None, **options) -> list:
        """Zero-shot editing (`POST /v1/edit/{task}`): `inpaint` (mask), `super-resolve` (scale_factor),
        `denoise` (sigma, add_noise), `colorize`, `stroke`; options as in `generate` (seed, timesteps, ...)."""
        files = {"image": ("image.png", _png_bytes(image), "image/png")}
        if mask is not None:
            files["mask"] = ("mask.png", _png_bytes(mask), "image/png")
        data = {}
        for key, value in options.items():
            if value is None:
                continue
            data[key] = ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)
        return self._images(self._request("POST", f"/v1/edit/{task}", files=files, data=data))

    def models(self) -> list:
        """`GET /v1/models`: the served model's description."""
        return self._request("GET", "/v1/models")["models"]

    def ready(self) -> bool:
        """Whether the server answers and a model replica is loaded (`GET /readyz`); False when it is down."""
        import requests

        try:
            return self._request("GET", "/readyz").get("status") == "ready"
        except (APIError, requests.ConnectionError, requests.Timeout):
            return False


def _png_bytes(image) -> bytes:
    """A PIL image, raw bytes of an image file, or a path -> bytes of an image file."""
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    if isinstance(image, str):
        with open(image, "rb") as f:
            return f.read()
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
