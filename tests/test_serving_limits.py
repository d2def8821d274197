"""Limits that need a server of their own (the embedded engine starts in seconds): a request over the server's time
limit gets its 503 and its remaining forward passes are not run; failed authentications from one address are rate
limited."""

import os
import re
import time

import numpy as np
import pytest

requests = pytest.importorskip("requests")
pytest.importorskip("fastapi", reason="needs the serve extra: pip install -e '.[serve]'")

from cm_diffusers.serving.local import LocalServer  # noqa: E402

KEY = "limits-key-" + "l" * 20
AUTH_FAILURES = 5


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("limits")
    env = dict(os.environ, OMP_NUM_THREADS="1", CM_DIFFUSERS_API_KEYS=KEY)
    command = ["serve", "--model", "fashion-mnist-cd", "--device", "cpu", "--max_batch_size", "16",
               "--max_images", "48", "--request_timeout_s", "1", "--auth_failures_per_minute", str(AUTH_FAILURES)]
    with LocalServer(command, log_path=folder / "server.log", env=env) as local:
        yield local


def _evaluations(server) -> float:
    text = requests.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).text
    return float(re.search(r"^cm_model_network_evaluations (\S+)", text, re.M).group(1))


def test_a_timed_out_request_runs_no_further_forward_pass(server):
    """48 images x 40 noise levels (120 passes of 16 rows, several seconds) against a 1 s limit: 503 with
    Retry-After after about 1 s, then the model's count of evaluated rows stops growing, far below the request's
    1,920, and a light request is answered at once."""
    headers = {"Authorization": f"Bearer {KEY}"}
    before = _evaluations(server)
    started = time.perf_counter()
    response = requests.post(server.url + "/v1/generate", headers=headers, timeout=60, json={
        "num_images": 48, "sigmas": np.geomspace(80.0, 0.01, 40).round(6).tolist(), "seed": 0})
    assert response.status_code == 503 and response.headers["Retry-After"], response.text
    assert time.perf_counter() - started < 10
    time.sleep(1.0)
    settled = _evaluations(server)
    time.sleep(2.0)
    assert _evaluations(server) == settled, "the timed-out request's work went on"
    assert settled - before < 48 * 40 / 2
    light = requests.post(server.url + "/v1/generate", headers=headers, json={"seed": 1}, timeout=60)
    assert light.status_code == 200 and light.json()["latency_ms"] < 1000


def test_failed_authentications_are_rate_limited_per_address(server):
    """After AUTH_FAILURES wrong keys from an address, it gets 429 with Retry-After, whatever key it sends (so that
    a key cannot be guessed meanwhile)."""
    url = server.url + "/v1/models"
    statuses = [requests.get(url, headers={"Authorization": f"Bearer wrong-key-{i:020d}"}, timeout=30).status_code
                for i in range(AUTH_FAILURES + 3)]
    assert statuses[:AUTH_FAILURES] == [401] * AUTH_FAILURES and statuses[-1] == 429, statuses
    blocked = requests.get(url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert blocked.status_code == 429 and int(blocked.headers["Retry-After"]) >= 1
    assert blocked.json()["error"]["type"] == "rate_limited"
    assert requests.get(server.url + "/healthz", timeout=30).status_code == 200  # open routes stay open
