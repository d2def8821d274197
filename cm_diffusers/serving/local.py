"""A `cm-diffusers` server (`serve` or `playground`) as a child process on this machine, for tests, benchmarks and
scripts that need a live server for a while: start it in its own process group on a free loopback port, wait until
it answers, and stop it together with everything it started (the local Ray instance of `serve`), and nothing else.

    with LocalServer(["serve", "--model", "fashion-mnist-cd"], log_path="server.log") as server:
        Client(server.url).generate(num_images=4)
"""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Optional, Sequence


class ServerStartError(RuntimeError):
    """The server exited, or did not answer in time, while starting; the message ends with its log."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class LocalServer:
    """`python -m cm_diffusers.cli <args> --port <free port>` in a new session (its own process group).

    `ready_path` is polled until it answers 200, for `timeout_s` at most. `stop()` sends SIGTERM to the command alone
    (`serve` then drains the requests in flight and shuts its Ray instance down, whose processes share the group and
    must outlive the drain), then SIGKILL to whatever is left of the group."""

    def __init__(self, args: Sequence[str], log_path: str, ready_path: str = "/readyz", env: Optional[dict] = None,
                 host: str = "127.0.0.1", timeout_s: float = 240.0):  # fmt: skip
        self.port = free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.command = [sys.executable, "-m", "cm_diffusers.cli", *args, "--port", str(self.port)]
        self.log_path, self.ready_path, self.env, self.timeout_s = str(log_path), ready_path, env, timeout_s
        self.process: Optional[subprocess.Popen] = None

    def start(self) -> "LocalServer":
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + self.timeout_s
        while not self._answers():
            if self.process.poll() is not None:
                raise ServerStartError(f"`{self._name()}` exited with {self.process.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise ServerStartError(
                    f"`{self._name()}` was not ready within {self.timeout_s:g} s:\n{self.log_tail()}"
                )
            time.sleep(1)
        return self

    def stop(self, drain_s: float = 90.0):
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(drain_s)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(process.pid, signal.SIGKILL)  # what of our group survived (nothing, normally)
        except ProcessLookupError:
            pass
        process.wait(10)

    def log_tail(self, chars: int = 4000) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-chars:]

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + self.ready_path, timeout=10) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def _name(self) -> str:
        return " ".join(self.command[3:])

    def __enter__(self) -> "LocalServer":
        return self.start()

    def __exit__(self, *exc):
        self.stop()
