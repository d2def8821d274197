"""Test doubles of the Hugging Face Hub that exercise huggingface_hub's real client code without a network.

- `make_hub_cache(folder, repo_id, cache_dir)` lays a folder out as a downloaded repo in a Hugging Face cache
  (`models--org--name/blobs`, `snapshots/<commit>/`, `refs/main`), so `from_pretrained("org/name", cache_dir=...)`
  with HF_HUB_OFFLINE=1 takes the same code path as after a real download.
- `FakeHub` is a loopback HTTP server that speaks the part of the Hub API that `HfApi.create_repo`,
  `create_commit`/`upload_folder` (regular files and basic LFS uploads), `create_branch` and `repo_info` use, and
  records every file that arrives. Point huggingface_hub at it with `FakeHub.configure(monkeypatch)`.
"""

import base64
import hashlib
import json
import os
import shutil
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml

# ----------------------------------------------------------------------------------------------------------------
# A Hugging Face cache folder


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a file, which the Hub uses as the etag of regular (non-LFS) files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def make_hub_cache(folder, repo_id: str, cache_dir, commit: str = None, revision: str = "main") -> Path:
    """Copies `folder` into `cache_dir` as the snapshot of `repo_id` at `revision`; returns the snapshot folder.

    Files are stored once in `blobs/` (named by sha256 for weights, by git sha1 otherwise, as the Hub's etags are)
    and linked from the snapshot, the layout `hf_hub_download` writes.
    """
    folder, cache_dir = Path(folder), Path(cache_dir)
    repo_dir = cache_dir / ("models--" + repo_id.replace("/", "--"))
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    if commit is None:
        digest = hashlib.sha1()
        for path in files:
            digest.update(path.relative_to(folder).as_posix().encode() + path.read_bytes())
        commit = digest.hexdigest()
    snapshot = repo_dir / "snapshots" / commit
    for path in files:
        data = path.read_bytes()
        is_lfs = path.suffix in (".safetensors", ".bin", ".png")
        etag = hashlib.sha256(data).hexdigest() if is_lfs else git_blob_sha1(data)
        blob = repo_dir / "blobs" / etag
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            shutil.copyfile(path, blob)
        target = snapshot / path.relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            target.symlink_to(os.path.relpath(blob, target.parent))
        except OSError:  # file systems without symlinks: huggingface_hub then copies too
            shutil.copyfile(blob, target)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / revision).write_text(commit)
    return snapshot


# ----------------------------------------------------------------------------------------------------------------
# A loopback Hub


class FakeHub:
    """The Hub endpoints that uploads use, on 127.0.0.1. Repos live in memory as {branch: {path: bytes}}.

    Attributes:
        repos: repo_id -> {"private": bool, "branches": {name: {"files": {path: bytes}, "head": sha}}}
        commits: list of dicts (repo_id, branch, oid, summary, files added in that commit, how each came)
        requests: list of (method, path) in arrival order
        validated_readmes: README.md contents sent to /api/validate-yaml
    """

    def __init__(self, token: str = "hf_fake_write_token", user: str = "test-user"):
        self.token, self.user = token, user
        self.repos, self.commits, self.requests, self.validated_readmes = {}, [], [], []
        self.lfs_objects = {}  # sha256 -> bytes
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()

    def configure(self, monkeypatch, token: bool = True, xet: bool = False):
        """Points huggingface_hub at this server, as HF_ENDPOINT would at import time, and goes online.

        `xet=False` (HF_HUB_DISABLE_XET) makes weights travel over the basic LFS protocol this server speaks.
        """
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "ENDPOINT", self.url)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", not xet)
        no_token_file = os.path.join(tempfile.gettempdir(), f"fakehub-{id(self)}-token")
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", no_token_file)
        monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
        if token:
            monkeypatch.setenv("HF_TOKEN", self.token)
        else:
            monkeypatch.delenv("HF_TOKEN", raising=False)

    def files(self, repo_id: str, branch: str = "main") -> dict:
        return dict(self.repos[repo_id]["branches"][branch]["files"])

    # -- request handling (called from the handler threads) --------------------------------------------------

    def handle(self, method: str, path: str, headers, body: bytes):
        path, _, _query = path.partition("?")
        with self._lock:
            self.requests.append((method, path))
        if path.startswith("/_lfs/") and method == "PUT":
            return self._lfs_put(path[len("/_lfs/"):], body)
        if headers.get("authorization") != f"Bearer {self.token}":
            return 401, {"error": "Invalid credentials in Authorization header"}
        if method == "POST" and path == "/api/repos/create":
            return self._create_repo(json.loads(body))
        if method == "POST" and path == "/api/validate-yaml":
            return self._validate_yaml(json.loads(body))
        if path.endswith(".git/info/lfs/objects/batch") and method == "POST":
            return self._lfs_batch(json.loads(body))
        parts = path.split("/")
        # /api/models/{ns}/{name}/{action}/{revision}
        if len(parts) >= 7 and parts[1] == "api" and parts[2] == "models":
            repo_id, action, revision = f"{parts[3]}/{parts[4]}", parts[5], "/".join(parts[6:])
            if repo_id not in self.repos:
                return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
            if method == "POST" and action == "preupload":
                return self._preupload(repo_id, revision, json.loads(body))
            if method == "POST" and action == "commit":
                return self._commit(repo_id, revision, body)
            if method == "POST" and action == "branch":
                return self._create_branch(repo_id, revision)
            if method == "GET" and action == "revision":
                return self._repo_info(repo_id, revision)
        return 404, {"error": f"FakeHub does not implement {method} {path}"}

    def _create_repo(self, payload):
        repo_id = f"{payload.get('organization') or self.user}/{payload['name']}"
        with self._lock:
            if repo_id in self.repos:
                return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}
            self.repos[repo_id] = {
                "private": payload.get("visibility") == "private" or bool(payload.get("private")),
                "branches": {"main": {"files": {}, "head": None}},
            }
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id}

    def _validate_yaml(self, payload):
        content = payload["content"]
        self.validated_readmes.append(content)
        if content.startswith("---"):
            metadata = yaml.safe_load(content.split("---")[1])
            if not isinstance(metadata, dict):
                return 400, {"errors": [{"message": "metadata must be a dict"}]}
        return 200, {"errors": [], "warnings": []}

    def _branch(self, repo_id, revision):
        return self.repos[repo_id]["branches"].get(revision)

    def _preupload(self, repo_id, revision, payload):
        branch = self._branch(repo_id, revision) or {"files": {}}
        files = []
        for item in payload["files"]:
            sample = base64.b64decode(item["sample"])
            lfs = item["path"].endswith(".safetensors") or b"\0" in sample  # the Hub sends binary files to LFS
            existing = branch["files"].get(item["path"])
            oid = None
            if existing is not None:
                oid = hashlib.sha256(existing).hexdigest() if lfs else git_blob_sha1(existing)
            files.append({"path": item["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": oid})  # fmt: skip
        return 200, {"files": files, "commitOid": branch.get("head")}

    def _lfs_batch(self, payload):
        objects = []
        for obj in payload["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.lfs_objects:
                entry["actions"] = {"upload": {"href": f"{self.url}/_lfs/{obj['oid']}"}}
            objects.append(entry)
        return 200, {"transfer": "basic", "objects": objects}

    def _lfs_put(self, oid, body):
        if hashlib.sha256(body).hexdigest() != oid:
            return 400, {"error": "sha256 mismatch"}
        with self._lock:
            self.lfs_objects[oid] = body
        return 200, {}

    def _commit(self, repo_id, revision, body):
        branch = self._branch(repo_id, revision)
        if branch is None:
            return 404, {"error": f"Revision {revision} not found"}, {"X-Error-Code": "RevisionNotFound"}
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header, added = lines[0]["value"], {}
        for line in lines[1:]:
            value = line["value"]
            if line["key"] == "file":
                added[value["path"]] = ("regular", base64.b64decode(value["content"]))
            elif line["key"] == "lfsFile":
                if value["oid"] not in self.lfs_objects:
                    return 422, {"error": f"LFS object {value['oid']} of {value['path']} was never uploaded"}
                added[value["path"]] = ("lfs", self.lfs_objects[value["oid"]])
            elif line["key"] == "deletedFile":
                added[value["path"]] = ("deleted", None)
            else:
                return 400, {"error": f"FakeHub does not implement commit operation {line['key']}"}
        digest = hashlib.sha1((branch["head"] or "").encode() + header["summary"].encode())
        for path, (_, data) in sorted(added.items()):
            digest.update(path.encode() + (data or b""))
        oid = digest.hexdigest()
        with self._lock:
            for path, (how, data) in added.items():
                if how == "deleted":
                    branch["files"].pop(path, None)
                else:
                    branch["files"][path] = data
            branch["head"] = oid
            self.commits.append({"repo_id": repo_id, "branch": revision, "oid": oid, "summary": header["summary"],
                                 "files": {path: how for path, (how, _) in added.items()}})  # fmt: skip
        return 200, {"commitUrl": f"{self.url}/{repo_id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}

    def _create_branch(self, repo_id, name):
        branches = self.repos[repo_id]["branches"]
        if name in branches:
            return 409, {"error": "Reference already exists"}
        branches[name] = {"files": dict(branches["main"]["files"]), "head": branches["main"]["head"]}
        return 200, {}

    def _repo_info(self, repo_id, revision):
        branch = self._branch(repo_id, revision)
        if branch is None:
            return 404, {"error": "Revision not found"}, {"X-Error-Code": "RevisionNotFound"}
        siblings = [{"rfilename": path} for path in sorted(branch["files"])]
        return 200, {"id": repo_id, "sha": branch["head"], "private": self.repos[repo_id]["private"],
                     "siblings": siblings}  # fmt: skip


def _make_handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().strip().split(b";")[0], 16)
                    if size == 0:
                        self.rfile.readline()
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _serve(self):
            body = self._body()
            headers = {key.lower(): value for key, value in self.headers.items()}
            result = hub.handle(self.command, self.path, headers, body)
            status, payload, extra_headers = (result + ({},))[:3]
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in extra_headers.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = _serve

        def log_message(self, *args):  # keep test output quiet
            pass

    return Handler
