"""A small Hugging Face Hub-compatible server on loopback, for tests that drive huggingface_hub's real client.

It implements only what the client calls for ``create_repo``, ``upload_folder`` (validate-yaml, preupload, NDJSON
commit; regular uploads only: the files are small), ``repo_info``/``list_repo_tree`` and ``hf_hub_download``
(HEAD/GET resolve), for model repositories and, read-only, dataset repositories (keyed ``datasets/{owner}/{name}``
in :attr:`FakeHub.repos`). Point the client at it with ``HF_ENDPOINT``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

import pytest


def git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """Repositories in memory: ``{repo_id: {"files": {path: bytes}, "sha": commit}}``; records write tokens."""

    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}
        self.write_auth: list[str | None] = []
        self.cards: list[dict] = []  # model-card metadata the client sent for validation
        self.lock = threading.Lock()


def make_handler(hub: FakeHub, endpoint: list[str]):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep pytest output clean
            pass

        def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _json(self, status: int, obj, headers: dict | None = None) -> None:
            self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})

        def _error(self, status: int, code: str, head: bool = False) -> None:
            self._send(status, json.dumps({"error": code}).encode(),
                       {"X-Error-Code": code, "X-Error-Message": code, "Content-Type": "application/json"}, head)

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        # -- writes ----------------------------------------------------------------------------------------
        def do_POST(self) -> None:
            path = urlparse(self.path).path
            body = self._body()
            hub.write_auth.append(self.headers.get("Authorization"))
            if path == "/api/repos/create":
                payload = json.loads(body)
                repo_id = "/".join(p for p in (payload.get("organization"), payload["name"]) if p)
                with hub.lock:
                    if repo_id in hub.repos:
                        return self._json(409, {"error": "You already created this model repo"})
                    hub.repos[repo_id] = {"files": {}, "sha": "0" * 40, "private": bool(payload.get("private"))}
                return self._json(200, {"url": f"{endpoint[0]}/{repo_id}", "name": repo_id})
            if path == "/api/validate-yaml":  # the client checks README.md's metadata before uploading it
                import yaml

                content = json.loads(body)["content"]
                try:
                    meta = yaml.safe_load(content.split("---")[1])
                    assert isinstance(meta, dict)
                except Exception as exc:  # noqa: BLE001
                    return self._json(400, {"errors": [{"message": f"invalid YAML: {exc}"}]})
                hub.cards.append(meta)
                return self._json(200, {"errors": [], "warnings": []})
            match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit)/([^/]+)", path)
            if not match:
                return self._error(404, "NotFound")
            repo_id, action = match.group(1), match.group(2)
            if repo_id not in hub.repos:
                return self._error(404, "RepoNotFound")
            if action == "preupload":
                files = json.loads(body)["files"]
                return self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                  for f in files]})
            repo = hub.repos[repo_id]
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            with hub.lock:
                for item in lines[1:]:
                    if item["key"] == "file":
                        assert item["value"]["encoding"] == "base64"
                        repo["files"][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    elif item["key"] == "deletedFile":
                        repo["files"].pop(item["value"]["path"], None)
                    else:  # LFS is not implemented: the test files are small
                        return self._error(400, "Unsupported")
                state = json.dumps({p: git_blob_sha(b) for p, b in sorted(repo["files"].items())})
                repo["sha"] = hashlib.sha1((repo["sha"] + json.dumps(lines[0]) + state).encode()).hexdigest()
            return self._json(200, {"commitUrl": f"{endpoint[0]}/{repo_id}/commit/{repo['sha']}",
                                    "commitOid": repo["sha"], "pullRequestUrl": None})

        # -- reads -----------------------------------------------------------------------------------------
        def do_GET(self) -> None:
            self._read(head=False)

        def do_HEAD(self) -> None:
            self._read(head=True)

        def _read(self, head: bool) -> None:
            path = urlparse(self.path).path
            match = re.fullmatch(r"/api/(models|datasets)/([^/]+/[^/]+)(?:/(revision|tree)/([^/]+)(?:/(.*))?)?",
                                 path)
            if match:
                kind, repo_id, action = match.group(1), match.group(2), match.group(3)
                repo = hub.repos.get(repo_id if kind == "models" else f"datasets/{repo_id}")
                if repo is None:
                    return self._error(404, "RepoNotFound", head)
                if action == "tree":
                    return self._json(200, [{"type": "file", "path": p, "size": len(b), "oid": git_blob_sha(b)}
                                            for p, b in sorted(repo["files"].items())])
                return self._json(200, {"id": repo_id, "sha": repo["sha"], "private": repo["private"],
                                        "siblings": [{"rfilename": p} for p in sorted(repo["files"])]})
            match = re.fullmatch(r"/((?:datasets/)?[^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            if not match:
                return self._error(404, "NotFound", head)
            repo = hub.repos.get(match.group(1))
            if repo is None:
                return self._error(404, "RepoNotFound", head)
            data = repo["files"].get(unquote(match.group(3)))
            if data is None:
                return self._error(404, "EntryNotFound", head)
            self._send(200, data, {"X-Repo-Commit": repo["sha"], "ETag": f'"{git_blob_sha(data)}"',
                                   "Content-Type": "application/octet-stream"}, head)

    return Handler


@pytest.fixture()
def hub_server():
    hub = FakeHub()
    endpoint: list[str] = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(hub, endpoint))
    endpoint.append(f"http://127.0.0.1:{server.server_address[1]}")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub, endpoint[0], server
    finally:
        server.shutdown()
        server.server_close()
