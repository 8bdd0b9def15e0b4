from __future__ import annotations

import re
import subprocess
import sys

from conftest import PROJECT_ROOT

from spfm.cli import build_parser, main

SUBCOMMANDS = ["demo", "synthetic", "download", "import", "list", "patch", "shard", "backbones", "run", "train",
               "embed", "bench", "verify", "push", "pull", "integrate", "domains", "enhance", "predict-expression"]


def test_help_lists_every_subcommand_with_one_line():
    result = subprocess.run([sys.executable, "-m", "spfm.cli", "--help"], capture_output=True, text=True, check=True)
    listed = re.findall(r"^    (\S+)", result.stdout, flags=re.M)
    assert listed == SUBCOMMANDS
    helps = {a.dest: a.help for a in build_parser()._subparsers._group_actions[0]._choices_actions}
    assert set(helps) == set(SUBCOMMANDS) and all(helps.values())


def test_a_command_that_loads_torch_geometric_prints_only_its_own_error(tmp_path):
    """PyG's import-time torch.jit deprecation warning is not shown by the command line (a fresh interpreter, so
    torch_geometric really is imported by the command)."""
    result = subprocess.run([sys.executable, "-W", "default", "-m", "spfm.cli", "domains", str(tmp_path / "no.h5ad"),
                             "-o", str(tmp_path / "out.h5ad"), "--n-domains", "2"], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"spfm domains: error: {tmp_path / 'no.h5ad'}: IN: AnnData file not found"]


def test_bad_input_gives_one_clear_error(tmp_path, capsys):
    code = main(["list", str(tmp_path / "missing")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == [f"spfm list: error: {tmp_path / 'missing'}: HEST root directory not found"]


def test_ci_runs_the_readme_test_command():
    readme = (PROJECT_ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", readme, flags=re.S).group(1).strip().splitlines()
    assert len(block) == 2 and "spfm demo" in block[0] and "pytest" in block[1]
    ci = (PROJECT_ROOT / ".ci" / "run").read_text().splitlines()
    assert block[1] in ci


def test_every_spfm_data_export_resolves():
    import spfm.data

    for name in spfm.data.__all__:
        assert getattr(spfm.data, name).__name__ == name
