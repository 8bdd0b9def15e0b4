"""Two real processes (gloo on CPU) under ``accelerate launch``: both ranks train, read disjoint data, end every step
with identical weights, write a checkpoint, and a resumed run continues exactly where the straight run went.

``accelerate launch --cpu`` starts several CPU processes only through MPI; without it, ``--multi_gpu`` with
``ACCELERATE_USE_CPU=1`` starts them through torch's elastic launcher and Accelerate runs them as MULTI_CPU (gloo).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

# Runs in each process: records, per training forward, the batch keys and a checksum of the backbone's weights
# (as they are before that step's update), for a straight run, a run stopped after 3 steps and its resumption.
_SCRIPT = r"""
import json, sys
import torch
from accelerate import PartialState
import spfm.models.objectives as registry
from spfm.train import train

shards, out = sys.argv[1], sys.argv[2]
records = []

class Recording(registry.ExpressionObjective):
    def forward(self, embeddings, batch, backbone):
        if self.training:
            weights = torch.cat([p.detach().flatten() for p in backbone.parameters()]).double()
            records.append({"keys": list(batch["key"]), "checksum": float(weights.sum()),
                            "sample": weights[::997].tolist()})
        return super().forward(embeddings, batch, backbone)

registry.OBJECTIVES["expression"] = Recording

def recipe(folder):
    return dict(data=dict(shards=shards, batch_size=8, shuffle=50, log1p=True),
                model=dict(backbone="vit_tiny_patch16_224", img_size=32),
                objectives=[dict(name="expression"), dict(name="contrastive", weight=0.5)],
                optim=dict(lr=1e-3, max_steps=6, warmup_steps=1), output_dir=folder, checkpoint_every=2,
                progress=False, tracker="none", eval=dict(split="val", every=3))

runs, metrics = {}, {}
plan = (("straight", "a", {}), ("stopped", "b", {"stop_after": 3}), ("resumed", "b", {"resume": True}))
for name, folder, kwargs in plan:
    metrics[name] = train(recipe(f"{out}/{folder}"), **kwargs)
    runs[name], records[:] = records[:], []
state = PartialState()
with open(f"{out}/rank{state.process_index}.json", "w") as f:
    json.dump({"world": state.num_processes, "type": str(state.distributed_type), "runs": runs, "metrics": metrics}, f)
state.destroy_process_group()
"""


@pytest.fixture
def shards(synthetic_shards: Path) -> Path:
    return synthetic_shards


def _free_port() -> int:
    """A port nobody listens on now (the default 29500 may be taken by another launch on this machine)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _keys(records: list[dict]) -> list[str]:
    return [key for record in records for key in record["keys"]]


def test_two_processes_train_disjoint_data_in_sync_and_resume(shards, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(_free_port()), str(script), str(shards), str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 and r["type"] == "DistributedType.MULTI_CPU" for r in ranks)

    straight = [r["runs"]["straight"] for r in ranks]
    assert [len(s) for s in straight] == [6, 6]  # both ranks ran every step
    # disjoint data: each rank reads its own training shard
    keys = [set(_keys(s)) for s in straight]
    assert keys[0] and keys[1] and not keys[0] & keys[1]
    assert {k.split("_")[0] for k in keys[0]} != {k.split("_")[0] for k in keys[1]}
    # gradients synced: identical weights on both ranks before every step, and they do change
    for a, b in zip(*straight):
        assert a["checksum"] == b["checksum"] and a["sample"] == b["sample"]
    assert straight[0][0]["checksum"] != straight[0][-1]["checksum"]
    # the contrastive loss saw the global batch (2 ranks x 8) as negatives
    assert ranks[0]["metrics"]["straight"]["contrastive/negatives"] == 15.0
    assert "eval/loss" in ranks[0]["metrics"]["straight"]

    # stopped after 3 steps, resumed: the same batches and the same weights as the straight run, on each rank
    for r in ranks:
        stopped, resumed, full = r["runs"]["stopped"], r["runs"]["resumed"], r["runs"]["straight"]
        assert len(stopped) == 3 and len(resumed) == 3
        assert _keys(stopped + resumed) == _keys(full)
        assert [x["checksum"] for x in stopped + resumed] == [x["checksum"] for x in full]
    state = json.loads((tmp_path / "b" / "checkpoints" / "checkpoint_1" / "training_state.json").read_text())
    assert state["step"] == 3 and state["world_size"] == 2 and [p["rank"] for p in state["positions"]] == [0, 1]
    a = load_file(tmp_path / "a" / "final" / "model.safetensors")
    b = load_file(tmp_path / "b" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
