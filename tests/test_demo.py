"""The README's first quick-start command: `spfm demo` runs the data path end to end."""

from __future__ import annotations

import json

import pytest

from spfm.cli import main


def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["shards"]["checksums_ok"] and "checksums OK" in printed
    # every train record comes back through the loader
    assert summary["read_back"]["records"] == summary["read_back"]["expected"] > 0
    assert summary["import"]["counts_identical"]
    assert summary["import"]["pixel_size_estimated"] == pytest.approx(summary["import"]["pixel_size_true"], rel=0.05)
    card = (out / "shards" / "README.md").read_text()
    assert card.startswith("---\n") and "train" in card
    assert (out / "figures" / "patches.png").stat().st_size > 10_000
    # an existing output is not clobbered without --overwrite
    assert main(["demo", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
