"""Every code block of the README runs: the ```python blocks in the default suite, the ```bash blocks (slow) as a
shell would, in a folder laid out as a new user's would be after the quick start.

The bash harness changes commands only where this machine differs from a user's, each rule below with its reason:
``pip install`` prefixes are dropped (the suite runs inside that install), the quick start's ``spfm demo`` and
``python -m pytest`` are the demo fixture and this run, training is shrunk with ``--set`` overrides, ``accelerate
launch`` gets ``--cpu`` (no GPU here), and the Hub is the loopback server of tests/fakehub.py serving the
synthetic corpus as HEST-1k samples.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import PROJECT_ROOT, TRAIN_SHRINK

README = (PROJECT_ROOT / "README.md").read_text()


def test_readme_python_examples_run(demo, monkeypatch):
    """Every ```python block of the README runs, in order, in the folder where the demo wrote spfm_demo/."""
    base, _ = demo
    monkeypatch.chdir(base)
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert blocks
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["images"].shape[1:] == (3, 224, 224)
    assert namespace["expression"].shape == namespace["mask"].shape
    assert len(namespace["ds"]) == sum(
        namespace["manifest"]["samples"][s]["n_records"] for s in namespace["manifest"]["splits"]["train"])
    assert namespace["enhanced"].n_obs == 4 * namespace["spots"].n_obs


def bash_commands(text: str) -> list[str]:
    """The commands of every ```bash block, continuation lines joined, trailing ``  # comments`` dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s{2,}#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def adapt(command: str) -> str | None:
    """The command as this harness runs it, or None when it is the quick start's own (see the module docstring)."""
    parts = [p.strip() for p in command.split("&&")]
    parts = [p for p in parts if not p.startswith("pip install")]
    if parts in (["spfm demo --out spfm_demo"], ["python -m pytest"]):
        return None
    (command,) = parts
    words = shlex.split(command)
    training = (words[:2] == ["spfm", "train"] or "spfm.train" in words
                or (words[:2] == ["spfm", "run"] and Path(words[2]).name.startswith(("pretrain", "finetune"))))
    if training:
        command += "".join(f" --set {item}" for item in TRAIN_SHRINK)
    if words[:2] == ["accelerate", "launch"]:
        command = command.replace("accelerate launch", "accelerate launch --cpu", 1)
    return command


def publish_fake_hest(hub, root: Path) -> None:
    """The synthetic corpus as MahmoodLab/hest: SYN00 -> TENX96, SYN01 -> TENX99 (bowel Visium), SYN02 -> TENX1."""
    names = {"SYN00": "TENX96", "SYN01": "TENX99", "SYN02": "TENX1"}
    files, rows = {}, []
    for old, new in names.items():
        files[f"st/{new}.h5ad"] = (root / "st" / f"{old}.h5ad").read_bytes()
        files[f"wsis/{new}.tif"] = (root / "wsis" / f"{old}.tif").read_bytes()
        meta = json.loads((root / "metadata" / f"{old}.json").read_text())
        meta.update(id=new, organ="Bowel" if new != "TENX1" else "Brain")
        files[f"metadata/{new}.json"] = json.dumps(meta).encode()
        rows.append(dict(id=new, organ=meta["organ"], species=meta["species"], st_technology=meta["st_technology"]))
    files["HEST_v1_1_0.csv"] = pd.DataFrame(rows).to_csv(index=False).encode()
    hub.repos["datasets/MahmoodLab/hest"] = {"files": files, "sha": "2" * 40, "private": False}


@pytest.mark.slow
def test_readme_bash_blocks_run(demo, hub_server, shared_data, tmp_path):
    base, _ = demo
    her2st, visium = shared_data / "her2st", shared_data / "visium_tiny"
    if not (her2st.is_dir() and visium.is_dir()):
        pytest.skip("../shared/data (her2st, visium_tiny) not present")
    hub, endpoint, _ = hub_server
    publish_fake_hest(hub, base / "spfm_demo" / "hest")
    work = tmp_path / "user"
    work.mkdir()
    (work / "spfm_demo").symlink_to(base / "spfm_demo")
    shutil.copytree(PROJECT_ROOT / "recipes", work / "recipes")
    for name in ("cnts", "spots", "img"):
        (work / name).symlink_to(her2st / name)
    (work / "outs").symlink_to(visium)
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf_home"),
           "HF_HUB_DISABLE_TELEMETRY": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("HF_HUB_OFFLINE", None)

    commands = [c for c in (adapt(c) for c in bash_commands(README)) if c is not None]
    assert len(commands) >= 10
    for command in commands:
        result = subprocess.run(["bash", "-c", command], cwd=work, env=env, capture_output=True, text=True)
        assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"

    assert {p.stem for p in (work / "hest_data" / "st").glob("*.h5ad")} == {"TENX96", "TENX99"}
    assert {p.stem for p in (work / "my_hest" / "st").glob("*.h5ad")} == {"B4", "V1"}
    assert (work / "runs" / "pretrain_synthetic" / "final" / "model.safetensors").is_file()
    assert (work / "runs" / "finetune_synthetic" / "final" / "model.safetensors").is_file()
    assert (work / "runs" / "ddp" / "final" / "model.safetensors").is_file()
    assert (work / "runs" / "quick" / "final" / "model.safetensors").is_file()
    assert (work / "runs" / "cellscape_demo.h5ad").is_file()


def test_harness_rules():
    assert adapt("pip install -e . && spfm demo --out spfm_demo") is None
    assert adapt('pip install -e ".[test]" && python -m pytest') is None
    assert adapt("spfm list x") == "spfm list x"
    assert adapt("spfm train recipes/a.yaml --resume").startswith("spfm train recipes/a.yaml --resume --set ")
    assert adapt("accelerate launch --num_processes 2 -m spfm.train r.yaml").startswith(
        "accelerate launch --cpu --num_processes 2 -m spfm.train r.yaml --set optim.max_steps=2")
    assert adapt("spfm run recipes/cellscape_x.yaml --set a=1") == "spfm run recipes/cellscape_x.yaml --set a=1"
    assert bash_commands("```bash\na \\\n  b   # note\n# only a comment\n```\n") == ["a    b"]
