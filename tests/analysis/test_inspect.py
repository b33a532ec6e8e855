"""`upcycle inspect` of a dense checkpoint (what `upcycle run`'s report shows for the dense baseline)."""

from __future__ import annotations

from tests.clitools import run_cli
from tests.training.helpers import save_tiny_gpt2


def test_inspect_reports_a_dense_checkpoint(capsys, tmp_path):
    path = save_tiny_gpt2(tmp_path / "dense")
    code, out, err = run_cli(capsys, ["inspect", path, "--json"])
    assert code == 0, err
    import json

    info = json.loads(out)
    assert info["parameters"]["total"] == info["parameters"]["active"] > 0 and "moe" not in info
    assert info["flops_per_token"]["forward"] == info["flops_per_token"]["dense_equivalent"]
