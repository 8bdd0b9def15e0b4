"""`spfm download hest` through huggingface_hub's real client against the loopback Hub (tests/fakehub.py).

The fake dataset mirrors HEST-1k's layout: a metadata table per release at the root, per-sample files under st/,
wsis/, metadata/, patches/, and folders spfm does not read (cellvit_seg/). The client runs in a subprocess that
gets HF_ENDPOINT the way a user sets it.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest

from spfm.data.download import hest_patterns, select_samples

CLIENT = """
import sys
from spfm.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture()
def fake_hest(hub_server, synthetic_shards):
    """The synthetic corpus published as datasets/MahmoodLab/hest on the loopback Hub."""
    hub, endpoint, _ = hub_server
    root = synthetic_shards.parent / "hest"
    files: dict[str, bytes] = {}
    rows = []
    for meta in sorted((root / "metadata").glob("*.json")):
        sid = meta.stem
        for folder in ("st", "wsis", "metadata"):
            for path in (root / folder).glob(f"{sid}.*"):
                files[f"{folder}/{path.name}"] = path.read_bytes()
        files[f"patches/{sid}.h5"] = b"not read by this test"
        files[f"cellvit_seg/{sid}_cellvit_seg.zip"] = b"spfm never downloads this"
        info = pd.read_json(meta, typ="series")
        rows.append(dict(id=sid, organ=info["organ"], species=info["species"], st_technology=info["st_technology"]))
    table = pd.DataFrame(rows)
    files["HEST_v1_1_0.csv"] = table.to_csv(index=False).encode()
    files["HEST_v1_0_2.csv"] = table.assign(organ="Old").to_csv(index=False).encode()  # an older release
    hub.repos["datasets/MahmoodLab/hest"] = {"files": files, "sha": "1" * 40, "private": False}
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(synthetic_shards.parent / "hf_home"),
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    return table, env


def run(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CLIENT, *args], capture_output=True, text=True, env=env)


def test_download_by_ids_fetches_only_what_spfm_reads(fake_hest, tmp_path):
    table, env = fake_hest
    out = tmp_path / "hest"
    result = run(env, "download", "hest", str(out), "--ids", "SYN00", "SYN02")
    assert result.returncode == 0, result.stderr[-3000:]
    got = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and ".cache" not in p.parts}
    assert got == {"st/SYN00.h5ad", "wsis/SYN00.tif", "metadata/SYN00.json",
                   "st/SYN02.h5ad", "wsis/SYN02.tif", "metadata/SYN02.json"}
    assert "2 sample(s)" in result.stdout and "SYN02" in result.stdout  # spfm list's table of what arrived

    from spfm.data.hest import read_sample

    sample = read_sample(out, "SYN02")
    assert sample.adata.n_obs > 0 and sample.slide.dimensions[0] > 0


def test_download_by_organ_uses_the_newest_metadata_table(fake_hest, tmp_path):
    table, env = fake_hest
    out = tmp_path / "hest"
    result = run(env, "download", "hest", str(out), "--organ", "brain", "--patches")
    assert result.returncode == 0, result.stderr[-3000:]
    brain = set(table.loc[table.organ == "Brain", "id"])
    assert brain and {p.stem for p in (out / "st").glob("*.h5ad")} == brain
    assert {p.stem for p in (out / "patches").glob("*.h5")} == brain
    assert not (out / "cellvit_seg").exists()


def test_download_errors_name_what_is_wrong(fake_hest, tmp_path):
    _, env = fake_hest
    result = run(env, "download", "hest", str(tmp_path / "a"), "--ids", "SYN00", "TENX999")
    assert result.returncode == 2 and "1 sample id(s) not in MahmoodLab/hest: ['TENX999']" in result.stderr
    result = run(env, "download", "hest", str(tmp_path / "b"), "--organ", "Kidney")
    assert result.returncode == 2 and "no HEST-1k sample matches {'organ': 'Kidney'}" in result.stderr
    result = run(env, "download", "hest", str(tmp_path / "c"))
    assert result.returncode == 2 and "choose samples" in result.stderr
    # a gated dataset looks like a missing one to an account without access
    env = {**env, "HF_HOME": str(tmp_path / "hf")}
    code = ("import sys; from spfm.data.download import download_hest\n"
            "try:\n    download_hest(sys.argv[1], ['X'], repo_id='MahmoodLab/gated')\n"
            "except Exception as exc:\n    print(type(exc).__name__, exc)")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "d")], capture_output=True, text=True,
                            env=env)
    assert "HubAccessError" in result.stdout and "https://huggingface.co/datasets/MahmoodLab/gated" in result.stdout
    assert not (tmp_path / "a" / "st").exists()  # nothing fetched before the ids were checked


def test_patterns_and_selection():
    assert hest_patterns(["A"], patches=True) == ["st/A.*", "wsis/A.*", "metadata/A.*", "patches/A.*"]
    table = pd.DataFrame(dict(id=["A", "B", "C"], organ=["Bowel", "bowel", "Lung"],
                              species=["Homo sapiens"] * 3, st_technology=["Visium", "Xenium", "Visium"]))
    assert select_samples(table, organ="BOWEL") == ["A", "B"]
    assert select_samples(table, organ="bowel", technology="visium") == ["A"]
    assert select_samples(table, ids=["C", "A"], species="Homo sapiens") == ["A", "C"]
    with pytest.raises(Exception, match="no 'st_technology' column"):
        select_samples(table.drop(columns="st_technology"), technology="Visium")


def test_cli_help_names_the_gate():
    from spfm.cli import build_parser

    text = build_parser()._subparsers._group_actions[0].choices["download"].format_help()
    assert "hest" in text and "gated" in text
