"""Atomic writes and the JSON layout they use."""

import json

import pytest

from spfm.atomic import atomic_write_json, dumps_readable


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
