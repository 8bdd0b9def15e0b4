"""Push and pull through huggingface_hub's real client against a small Hub-compatible server on loopback.

The server implements only what the client calls for ``create_repo``, ``upload_folder`` (validate-yaml, preupload,
NDJSON commit; regular uploads only: the files are small), ``repo_info``/``list_repo_tree`` and ``hf_hub_download``
(HEAD/GET resolve). The client runs in subprocesses that get ``HF_ENDPOINT`` (and later ``HF_HUB_OFFLINE=1``) the
way a user sets them; the first one also checks that ``import spfm`` stays light and that transformers' Auto
classes learn spfm's model types when transformers loads them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from spfm.hub import save_pretrained
from spfm.models.backbones import create_backbone

TESTS = Path(__file__).resolve().parent


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
