"""A stand-in for the Hugging Face Hub on 127.0.0.1, enough for the real ``huggingface_hub`` client to list a
model repository and fetch its files: ``GET /api/models/<repo>[/revision/<rev>]`` (with ``blobs``: sizes,
git blob ids, LFS sha256) and ``HEAD``/``GET /<repo>/resolve/<rev>/<path>`` (ranges, the Hub's
``X-Repo-Commit``/``X-Linked-Etag``/``X-Linked-Size`` headers, ``X-Error-Code: GatedRepo`` for a gated
repository without a valid token).

Knobs for the tests: ``gated`` (repositories that need ``token``; ``gated_listing``: for their file list too),
``corrupt`` (paths served with flipped
bytes), ``cut_after`` (paths whose next GET stops after that many bytes, once), and ``requests`` (every
request as ``(method, repo, path, range header)``).

    with HubStandIn({"org/repo": {"a.bin": b"..."}}) as hub:
        os.environ["HF_ENDPOINT"] = hub.endpoint
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

LFS_FROM = 1024  # files this large are "LFS" files (sha256 etag), smaller ones plain git blobs


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubStandIn:
    def __init__(self, repos: dict[str, dict[str, bytes]], gated=(), token: str = "hf_standin_token"):
        self.repos = repos
        self.gated = set(gated)
        self.token = token
        self.gated_listing = False  # a gated repository's file list needs the token too
        self.corrupt: set[tuple[str, str]] = set()
        self.cut_after: dict[tuple[str, str], int] = {}
        self.requests: list[tuple[str, str, str, str]] = []
        self.commit = hashlib.sha1(b"standin").hexdigest()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> "HubStandIn":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def fetches(self, method: str = "GET") -> list[tuple[str, str, str]]:
        """``(repo, path, range)`` of every file request of ``method``."""
        return [(r, p, rng) for m, r, p, rng in self.requests if m == method and p]

    # -- HTTP ---------------------------------------------------------------------------------------------------
    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                hub._serve(self, head=False)

            def do_HEAD(self):
                hub._serve(self, head=True)

        return Handler

    def _send(self, h, status: int, headers: dict, body: bytes = b"", head: bool = False) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, str(v))
        if "Content-Length" not in headers:
            h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head and body:
            h.wfile.write(body)

    def _error(self, h, status: int, code: str, message: str, head: bool) -> None:
        body = json.dumps({"error": message}).encode()
        self._send(h, status, {"Content-Type": "application/json", "X-Error-Code": code, "X-Error-Message": message},
                   body, head)

    def _serve(self, h, head: bool) -> None:
        url = urlparse(h.path)
        path = unquote(url.path)
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/[^/]+)?", path)
        if m:
            self.requests.append(("API", m.group(1), "", ""))
            return self._model_info(h, m.group(1), head)
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if not m:
            return self._error(h, 404, "EntryNotFound", f"no route {path}", head)
        repo, _, file = m.groups()
        self.requests.append(("HEAD" if head else "GET", repo, file, h.headers.get("Range", "")))
        if repo not in self.repos:
            return self._error(h, 404, "RepoNotFound", f"Repository {repo} not found", head)
        if repo in self.gated and h.headers.get("Authorization", "") != f"Bearer {self.token}":
            return self._error(h, 401, "GatedRepo", f"Access to model {repo} is restricted", head)
        files = self.repos[repo]
        if file not in files:
            return self._error(h, 404, "EntryNotFound", f"{file} does not exist", head)
        data = files[file]
        etag = hashlib.sha256(data).hexdigest() if len(data) >= LFS_FROM else git_blob_id(data)
        if (repo, file) in self.corrupt:
            data = bytes(b ^ 0xFF for b in data[:16]) + data[16:]
        headers = {"X-Repo-Commit": self.commit, "ETag": f'"{etag}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if len(data) >= LFS_FROM:
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": len(data)})
        start, status = 0, 200
        rng = re.fullmatch(r"bytes=(\d+)-", h.headers.get("Range", ""))
        if rng and not head:
            start, status = int(rng.group(1)), 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        headers["Content-Length"] = len(body)
        cut = None if head else self.cut_after.pop((repo, file), None)
        if cut is None:
            return self._send(h, status, headers, body, head)
        # Promise the whole body, send part of it and drop the connection: an interrupted download.
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, str(v))
        h.end_headers()
        h.wfile.write(body[:cut])
        h.wfile.flush()
        h.close_connection = True
        h.connection.shutdown(2)

    def _model_info(self, h, repo: str, head: bool) -> None:
        if repo not in self.repos:
            return self._error(h, 404, "RepoNotFound", f"Repository {repo} not found", head)
        if self.gated_listing and repo in self.gated and h.headers.get("Authorization", "") != f"Bearer {self.token}":
            return self._error(h, 401, "GatedRepo", f"Access to model {repo} is restricted", head)
        siblings = []
        for name, data in sorted(self.repos[repo].items()):
            s = {"rfilename": name, "size": len(data), "blobId": git_blob_id(data)}
            if len(data) >= LFS_FROM:
                s["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            siblings.append(s)
        info = {"id": repo, "modelId": repo, "sha": self.commit, "private": False,
                "gated": "manual" if repo in self.gated else False, "siblings": siblings}
        self._send(h, 200, {"Content-Type": "application/json"}, json.dumps(info).encode(), head)
