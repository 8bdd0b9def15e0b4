"""Push and pull through huggingface_hub's real client against a small Hub-compatible server on loopback.

The server implements only what the client calls for ``create_repo``, ``upload_folder`` (validate-yaml, preupload,
NDJSON commit; regular uploads only: the files are small), ``repo_info``/``list_repo_tree`` and ``hf_hub_download``
(HEAD/GET resolve). The client runs in subprocesses that get ``HF_ENDPOINT`` (and later ``HF_HUB_OFFLINE=1``) the
way a user sets them; the first one also checks that ``import spfm`` stays light and that transformers' Auto
classes learn spfm's model types when transformers loads them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import torch
from safetensors.torch import load_file

from spfm.hub import save_pretrained
from spfm.models.backbones import create_backbone

TESTS = Path(__file__).resolve().parent


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
            match = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/(revision|tree)/([^/]+)(?:/(.*))?)?", path)
            if match:
                repo = hub.repos.get(match.group(1))
                if repo is None:
                    return self._error(404, "RepoNotFound", head)
                if match.group(2) == "tree":
                    return self._json(200, [{"type": "file", "path": p, "size": len(b), "oid": git_blob_sha(b)}
                                            for p, b in sorted(repo["files"].items())])
                return self._json(200, {"id": match.group(1), "sha": repo["sha"], "private": repo["private"],
                                        "siblings": [{"rfilename": p} for p in sorted(repo["files"])]})
            match = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
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


def run_client(script: str, env: dict, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env,
                            cwd=TESTS)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


ONLINE = """
import sys
import spfm  # light: no torch, no transformers; the Auto classes learn spfm's kinds when transformers loads them
assert "transformers" not in sys.modules and "torch" not in sys.modules
from transformers import AutoModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
assert "spfm-backbone" in CONFIG_MAPPING and "spfm-histosge" in CONFIG_MAPPING
from spfm.hub.modeling_spfm import SpfmBackboneConfig, SpfmBackboneModel
assert AutoModel._model_mapping[SpfmBackboneConfig] is SpfmBackboneModel
import json, torch
from spfm.cli import main
src, nd_src, pulled, images, out = sys.argv[1:6]
assert main(["push", src, "alice/tiny-backbone", "--dataset", "hest-1k", "--message", "first"]) == 0
assert main(["push", nd_src, "alice/nd-backbone"]) == 0  # a no-derivatives backbone: weights left out
assert main(["pull", "alice/tiny-backbone", pulled]) == 0
model = spfm.from_pretrained("alice/tiny-backbone")  # through the cache
x = torch.load(images, weights_only=True)
with torch.no_grad():
    torch.save(model.embed(x), out)
try:
    spfm.from_pretrained("alice/missing")
except Exception as exc:
    print("MISSING:", type(exc).__name__, exc)
try:
    spfm.from_pretrained("bob/pickled")
except Exception as exc:
    print("LOAD:", type(exc).__name__, exc)
print("PULL:", main(["pull", "bob/pickled", sys.argv[6]]))
try:
    spfm.from_pretrained("bob/bert")
except Exception as exc:
    print("BERT:", type(exc).__name__, exc)
"""

OFFLINE = """
import sys, torch, spfm
from huggingface_hub import constants
assert constants.HF_HUB_OFFLINE
images, out = sys.argv[1:3]
model = spfm.from_pretrained("alice/tiny-backbone")
with torch.no_grad():
    torch.save(model.embed(torch.load(images, weights_only=True)), out)
try:
    spfm.from_pretrained("alice/never-downloaded")
except Exception as exc:
    print("OFFLINE:", type(exc).__name__, exc)
"""


def test_push_pull_byte_identical_offline_and_bad_repos(hub_server, tmp_path):
    hub, endpoint, server = hub_server
    torch.manual_seed(0)
    backbone = create_backbone("vit_tiny_patch16_224", img_size=32, depth=2)
    save_pretrained(backbone, tmp_path / "src", license="apache-2.0")
    nd = create_backbone("uni", img_size=32, depth=1, embed_dim=64, num_heads=2)  # UNI's licence, tiny shape
    save_pretrained(nd, tmp_path / "nd")
    images = torch.rand(2, 3, 32, 32)
    torch.save(images, tmp_path / "images.pt")
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf"), "HF_TOKEN": "hf_test_token",
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    # bad repositories: one holding only a pickle, one that is not an spfm model
    files = {p.name: p.read_bytes() for p in (tmp_path / "src").iterdir() if p.name != "model.safetensors"}
    files["pytorch_model.bin"] = b"\x80\x04not really a pickle, and never read"
    hub.repos["bob/pickled"] = {"files": files, "sha": "1" * 40, "private": False}
    hub.repos["bob/bert"] = {"files": {"config.json": b'{"model_type": "bert"}'}, "sha": "2" * 40, "private": False}
    result = run_client(ONLINE, env, str(tmp_path / "src"), str(tmp_path / "nd"), str(tmp_path / "pulled"),
                        str(tmp_path / "images.pt"), str(tmp_path / "online.pt"), str(tmp_path / "pickled"))

    # what was pushed is what was pulled, byte for byte
    files = hub.repos["alice/tiny-backbone"]["files"]
    assert sorted(files) == ["README.md", "config.json", "configuration_spfm.py", "model.safetensors",
                             "modeling_spfm.py"]
    for name, data in files.items():
        assert (tmp_path / "pulled" / name).read_bytes() == data, name
    assert set(hub.write_auth) == {"Bearer hf_test_token"}  # the token came from the environment
    weights = load_file(tmp_path / "pulled" / "model.safetensors")
    assert all(torch.equal(weights[k], v) for k, v in backbone.state_dict().items())
    card = files["README.md"].decode()
    assert 'library_name: "spfm"' in card and '- "hest-1k"' in card and 'license: "apache-2.0"' in card
    meta = hub.cards[0]  # parsed by the server as YAML
    assert meta["library_name"] == "spfm" and meta["datasets"] == ["hest-1k"] and "spfm-backbone" in meta["tags"]
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "online.pt", weights_only=True), backbone(images))
    assert "MISSING: HubAccessError" in result.stdout
    assert "LOAD: DataError bob/pickled: no model.safetensors; found only pickle weights ['pytorch_model.bin']" \
        in result.stdout
    assert "PULL: 2" in result.stdout and "has no model.safetensors" in result.stderr
    assert not (tmp_path / "pickled" / "pytorch_model.bin").exists()  # pickles are not even downloaded
    assert "BERT: DataError" in result.stdout and "not an spfm model: model_type 'bert'" in result.stdout

    # the no-derivatives backbone went up without its weights; its card says where they come from
    nd_files = hub.repos["alice/nd-backbone"]["files"]
    assert "model.safetensors" not in nd_files
    assert json.loads(nd_files["config.json"])["backbone_weights"] == "external"
    assert 'base_model: "MahmoodLab/uni"' in nd_files["README.md"].decode()

    # offline, with the server gone: the cache serves what was downloaded, anything else fails clearly
    server.shutdown()
    offline = {**env, "HF_HUB_OFFLINE": "1"}
    result = run_client(OFFLINE, offline, str(tmp_path / "images.pt"), str(tmp_path / "offline.pt"))
    assert torch.equal(torch.load(tmp_path / "offline.pt", weights_only=True),
                       torch.load(tmp_path / "online.pt", weights_only=True))
    assert "OFFLINE: HubAccessError" in result.stdout and "offline" in result.stdout
