"""The cards in data_cards/ stay what the code renders."""

from __future__ import annotations

import re

import pytest
from conftest import PROJECT_ROOT

CARDS = PROJECT_ROOT / "data_cards"


def test_hest1k_card_is_rendered_from_the_metadata_table(shared_data):
    from spfm.data.datacard import render_hest1k_card

    table = shared_data / "hest" / "HEST_v1_1_0.csv"
    if not table.is_file():
        pytest.skip("HEST metadata table not in ../shared/data")
    # regenerate with: python -c "from spfm.data.datacard import render_hest1k_card as r; print(r(TABLE), end='')"
    assert (CARDS / "hest1k.md").read_text() == render_hest1k_card(table)


def test_example_shard_card_has_the_sections_spfm_shard_writes(synthetic_shards):
    """data_cards/example_shards_her2st.md is what `spfm shard` wrote for HER2ST; a fresh card has the same
    front-matter keys and sections."""
    import json

    import yaml

    from spfm.data.datacard import render_data_card

    fresh = render_data_card(json.loads((synthetic_shards / "manifest.json").read_text()))
    example = (CARDS / "example_shards_her2st.md").read_text()

    def parts(text: str) -> tuple[list[str], list[str]]:
        front = yaml.safe_load(text.split("---")[1])
        return sorted(front), re.findall(r"^## (.+)$", text, flags=re.M)

    keys, sections = parts(example)
    fresh_keys, fresh_sections = parts(fresh)
    # the synthetic corpus records a licence (CC0), HER2ST none: that key and section come and go with it
    assert set(fresh_keys) - {"license"} == set(keys)
    assert [s for s in fresh_sections if s != "Licence"] == sections
    assert "| B4 | Breast |" in example and "test: B4" in example
