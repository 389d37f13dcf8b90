import csv
import json
from importlib.resources import files

import pytest
import torch
import torch.nn.functional as F
from fvcore.nn import FlopCountAnalysis

from dit.flops import count_params, measure, sdpa_flop_handle
from orchestrator.cli import main as cli

PAPER = list(csv.DictReader(files("dit.reference").joinpath("dit_paper_table4.csv").open()))
PARAMS_M = {"S": 33, "B": 130, "L": 458, "XL": 675}


@pytest.fixture(scope="module")
def table():
    return {row["model"]: measure(row["model"], image_size=256) for row in PAPER}


def test_every_gflops_entry_within_half_a_percent_and_params_within_one(table):
    for row in PAPER:
        got = table[row["model"]]
        printed = float(row["gflops"])
        # 0.5 %, or the rounding of the printed figure where that is wider (0.36 is 0.355..0.365)
        assert abs(got.gflops - printed) <= max(5e-3 * printed, 0.005), row["model"]
        size = row["model"][4:].split("/")[0]
        assert got.params == pytest.approx(PARAMS_M[size] * 1e6, rel=1e-2), row["model"]


def test_gflops_table_to_the_printed_digit(table):
    # Our convention reproduces the printed two decimals for 11 of the 12 models; DiT-B/4
    # is 5.5664 against a printed 5.56 (documented in dit/flops.py).
    mismatched = [m for m, r in table.items() if f"{r.gflops:.2f}" != next(p["gflops"] for p in PAPER if p["model"] == m)]
    assert mismatched == ["DiT-B/4"]
    assert table["DiT-B/4"].gflops == pytest.approx(5.56, abs=0.01)


def test_xl2_at_512():
    assert measure("DiT-XL/2", image_size=512).gflops == pytest.approx(524.6, rel=5e-3)


def test_sdpa_handle_counts_what_explicit_matmuls_count():
    q, k, v = (torch.randn(2, 3, 10, 8) for _ in range(3))

    class Fused(torch.nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

    class Explicit(torch.nn.Module):
        def forward(self, q, k, v):
            return (q @ k.transpose(-2, -1)).softmax(-1) @ v

    fused = FlopCountAnalysis(Fused(), (q, k, v))
    fused.set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_handle)
    explicit = FlopCountAnalysis(Explicit(), (q, k, v))
    assert fused.total() == explicit.total() == 2 * 2 * 3 * 10 * 10 * 8
    # without our handle fvcore silently drops attention
    assert FlopCountAnalysis(Fused(), (q, k, v)).total() == 0


def test_count_params_excludes_the_fixed_positional_table():
    from dit.models import create_model

    model = create_model({"depth": 1, "hidden_size": 32, "num_heads": 2, "patch_size": 2, "input_size": 8})
    assert count_params(model) == sum(v.numel() for k, v in model.state_dict().items() if k != "pos_embed")


def test_cli_json(capsys):
    assert cli(["flops", "DiT-S/8", "DiT-B/8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [o["model"] for o in out] == ["DiT-S/8", "DiT-B/8"]
    assert set(out[0]) >= {"model", "image_size", "gflops", "params"}
    assert out[0]["image_size"] == 256 and out[0]["gflops"] == pytest.approx(0.36, abs=0.005)


def test_cli_table_and_bad_input(capsys):
    assert cli(["flops", "DiT-S/4"]) == 0
    assert "DiT-S/4" in capsys.readouterr().out
    assert cli(["flops", "DiT-Z/4"]) == 2
    assert "unknown model 'DiT-Z/4'" in capsys.readouterr().err
    assert cli(["flops", "DiT-S/4", "--image-size", "100"]) == 2
    assert "--image-size" in capsys.readouterr().err
