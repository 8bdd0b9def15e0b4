"""Atomic writes, the JSON layout they use, and checked h5ad reads."""

import json

import pytest

from spfm.atomic import atomic_write_h5ad, atomic_write_json, dumps_readable, read_h5ad
from spfm.errors import DataError


@pytest.mark.parametrize("value", [
    {"genes": ["A", "B"], "samples": {"s1": {"n": 3, "xy": [[1.5, 2.0], [3.0, None]]}}, "empty": {}, "none": []},
    [{"a": 1}, [1, [2]], "x"],
    {"unicode": "µm é", "bool": True, "nested": [[], {}]},
    3.25,
])
def test_dumps_readable_round_trips(value):
    assert json.loads(dumps_readable(value)) == value


def test_flat_lists_stay_on_one_line_and_objects_spread():
    text = dumps_readable({"genes": [f"G{i}" for i in range(1000)], "meta": {"n": 1}})
    lines = text.splitlines()
    assert len(lines) == 6  # {, "genes": [...], "meta": {, "n": 1, }, }
    assert lines[1].startswith('  "genes": ["G0", "G1"') and lines[1].endswith('"G999"],')
    assert lines[3] == '    "n": 1'


def test_atomic_write_json_replaces_whole_file(tmp_path):
    path = tmp_path / "m.json"
    atomic_write_json(path, {"a": list(range(5))})
    atomic_write_json(path, {"b": 1})
    assert json.loads(path.read_text()) == {"b": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]  # no temporary left behind


def test_h5ad_round_trip_and_clear_errors(tmp_path):
    import anndata as ad
    import numpy as np

    a = ad.AnnData(np.arange(6, dtype=np.float32).reshape(3, 2))
    out = atomic_write_h5ad(a, tmp_path / "sub" / "a.h5ad")  # parent folder created
    assert out == tmp_path / "sub" / "a.h5ad" and [p.name for p in out.parent.iterdir()] == ["a.h5ad"]
    np.testing.assert_array_equal(read_h5ad(out).X, a.X)
    with pytest.raises(DataError, match=r"missing\.h5ad: inputs: input AnnData not found"):
        read_h5ad(tmp_path / "missing.h5ad", "input AnnData", field="inputs")
    bad = tmp_path / "bad.h5ad"
    bad.write_bytes(b"not an HDF5 file")
    with pytest.raises(DataError, match=r"bad\.h5ad: cannot read AnnData file as h5ad"):
        read_h5ad(bad)
