"""Study specs: validation, grid expansion, names, resources, costs, errors, CLI."""

import copy
import dataclasses
import csv
import json
import re
from importlib.resources import files
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from dit.errors import ConfigError
from orchestrator.cli import main as cli
from orchestrator.spec import (
    Cell,
    TrialConfig,
    load_spec,
    order_by_cost,
    parse_spec,
    spec_json_schema,
)

ROOT = Path(__file__).resolve().parents[1]
STUDIES = sorted((ROOT / "studies").glob("*.yaml"))
PAPER = {r["model"]: float(r["gflops"]) for r in csv.DictReader(files("dit.reference").joinpath("dit_paper_table4.csv").open())}

# A dry-run spec (no manifest on disk) on 8x8 single-channel latents.
BASE = {
    "name": "t",
    "data": {"manifest": "nowhere/manifest.json", "image_size": 8, "num_classes": 10,
             "latent": {"channels": 1, "size": 8, "vae_factor": 1}},
    "grid": {"size": [{"name": "tiny", "depth": 1, "hidden_size": 32, "num_heads": 2},
                      {"name": "wide", "depth": 1, "hidden_size": 64, "num_heads": 4}],
             "patch": [2, 4]},
    "recipe": {"steps": 10, "global_batch": 8},
}


def spec(tmp_path=None, **changes):
    raw = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = raw
        for p in parents:
            node = node.setdefault(p, {})
        if value is DELETE:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return parse_spec(raw, source="s.yaml", base_dir=tmp_path or ROOT)


DELETE = object()


def names(s):
    return [c.name for c in s.cells()]


# --------------------------------------------------------------------------------------------
# The shipped studies
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", STUDIES, ids=[p.name for p in STUDIES])
def test_every_study_validates(path):
    s = load_spec(path)
    cells = s.cells()
    assert cells and len({c.name for c in cells}) == len(cells)
    for c in cells:
        assert isinstance(c.trial_config("runs"), TrialConfig)
        assert c.train.data == s.data_info.manifest
    json.dumps(s.resolved(costs=False))


def test_expected_studies_exist():
    assert {"demo.yaml", "dit_paper_256.yaml", "block_ablation.yaml"} <= {p.name for p in STUDIES}


def test_paper_grid_dry_run_matches_the_paper():
    s = load_spec(ROOT / "studies" / "dit_paper_256.yaml")
    cells = s.cells()
    assert [c.model for c in cells] == [f"DiT-{z}/{p}" for z in ("S", "B", "L", "XL") for p in (2, 4, 8)]
    assert names(s)[:3] == ["DiT-S-2", "DiT-S-4", "DiT-S-8"]
    for c in cells:
        printed = PAPER[c.model]
        assert abs(c.gflops - printed) <= max(5e-3 * printed, 0.005), c.model
        assert c.tokens == (32 // c.patch_size) ** 2
        assert c.compute_gflops == pytest.approx(c.gflops * 256 * 400_000 * 3)
        assert c.gpu_hours == pytest.approx(c.compute_gflops * 1e9 * 2 / 400e12 / 3600)
        assert c.use_gpu and c.workers == {"S": 1, "B": 2, "L": 4, "XL": 8}[c.size]
        assert (c.train.precision, c.train.zero_stage, c.train.ema_decay, c.train.lr) == ("bf16", 2, 0.9999, 1e-4)
        mc = c.model_config()
        assert (mc.input_size, mc.in_channels, mc.num_classes) == (32, 4, 1000)
    assert not s.data_info.exists and s.data_info.image_size == 256
    resolved = json.loads(json.dumps(s.resolved()))
    assert resolved["total"]["compute_gflops"] == pytest.approx(sum(c.compute_gflops for c in cells))
    assert [c["name"] for c in resolved["cells"]] == names(s)


def test_demo_spec(digits8, tmp_path):
    s = load_spec(ROOT / "studies" / "demo.yaml")
    assert names(s) == [f"DiT-{z}-{p}" for z in ("xs", "s", "m") for p in (8, 4, 2)]
    assert s.data_info.manifest == str(ROOT / "data" / "digits16" / "manifest.json")
    assert s.data.builtin == "digits"  # `ditscale run` prepares it when missing
    c = s.cells()[0]
    assert (c.workers, c.cpus_per_worker, c.use_gpu, c.train.steps, c.train.global_batch) == (1, 1.0, False, 1300, 32)
    assert not c.train.random_flip and c.train.eval.sampler == "ddim" and c.train.eval.clip_denoised is None
    assert (c.model_config().input_size, c.model_config().in_channels) == (16, 1)
    assert c.train.eval.enabled and c.train.eval.features == "digits-cnn-v1"
    # With the data prepared the shape comes from the manifest and is checked against the spec.
    raw = yaml.safe_load((ROOT / "studies" / "demo.yaml").read_text())
    raw["data"]["manifest"] = digits8
    raw["data"]["image_size"] = raw["data"]["latent"]["size"] = 8
    prepared = parse_spec(raw, source="demo.yaml")
    assert prepared.data_info.exists and prepared.data_info.num_classes == 10
    prepared.check_data()
    raw["data"]["latent"]["size"] = 16
    with pytest.raises(ConfigError, match=r"demo.yaml: data.latent.size: 16 does not match the manifest's 8"):
        parse_spec(raw, source="demo.yaml")
    del raw["data"]["latent"], raw["data"]["num_classes"], raw["data"]["image_size"]
    assert parse_spec(raw).data_info.latent_size == 8  # all read from the manifest
    with pytest.raises(ConfigError, match="s.yaml: data.manifest: manifest .* not found"):
        spec().check_data()  # a dry-run spec loads; running it needs the data


# --------------------------------------------------------------------------------------------
# Grid expansion and names
# --------------------------------------------------------------------------------------------


def test_product_order_and_names():
    s = spec(grid__block=["adaln-zero", "adaln"], grid__recipe={"lr": [1e-4, "3e-4"]})
    assert len(s.cells()) == 2 * 2 * 2 * 2
    assert names(s)[:4] == [
        "DiT-tiny-2-adaln-zero-lr1e-4", "DiT-tiny-2-adaln-zero-lr3e-4",
        "DiT-tiny-2-adaln-lr1e-4", "DiT-tiny-2-adaln-lr3e-4",
    ]
    c = s.cells()[3]
    assert c.train.lr == 3e-4 and c.block == "adaln" and c.train.block == "adaln"
    assert c.axes == {"size": "tiny", "patch": 2, "block": "adaln", "lr": 3e-4}
    assert c.model == {"depth": 1, "hidden_size": 32, "num_heads": 2, "patch_size": 2}
    assert names(spec(grid__block=["adaln-zero", "adaln"], grid__recipe={"lr": [1e-4, "3e-4"]})) == names(s)


def test_default_axes_stay_out_of_names():
    assert names(spec()) == ["DiT-tiny-2", "DiT-tiny-4", "DiT-wide-2", "DiT-wide-4"]
    # a single non-default block, or a single recipe value that differs from the recipe, shows
    assert names(spec(grid__block="adaln", grid__patch=[2]))[0] == "DiT-tiny-2-adaln"
    assert names(spec(grid__recipe={"lr": 3e-4}, grid__patch=[2]))[0] == "DiT-tiny-2-lr3e-4"
    assert names(spec(grid__recipe={"lr": 1e-4}, grid__patch=[2]))[0] == "DiT-tiny-2"
    assert names(spec(grid__recipe={"global_batch": [8, 16]}, grid__patch=[2]))[:2] == ["DiT-tiny-2-bs8", "DiT-tiny-2-bs16"]


def test_builtin_sizes_and_mixed():
    s = spec(**{"data__latent": {"channels": 4, "size": 32, "vae_factor": 8}, "data__image_size": 256,
                "grid__size": ["S", "DiT-B", {"name": "mini", "depth": 2, "hidden_size": 64, "num_heads": 4}],
                "grid__patch": [8]})
    assert names(s) == ["DiT-S-8", "DiT-B-8", "DiT-mini-8"]
    assert [c.model for c in s.cells()][:2] == ["DiT-S/8", "DiT-B/8"]


def test_include_and_exclude():
    s = spec(grid__recipe={"lr": [1e-4, 3e-4]},
             grid__exclude=[{"size": "wide", "patch": 2}, {"lr": "3e-4", "patch": 4}],
             grid__include=[{"size": "wide", "patch": 2, "lr": 1e-3, "block": "in-context"},
                            {"size": {"name": "deep", "depth": 3, "hidden_size": 32, "num_heads": 2}, "patch": 8}])
    assert names(s) == [
        "DiT-tiny-2-lr1e-4", "DiT-tiny-2-lr3e-4", "DiT-tiny-4-lr1e-4", "DiT-wide-4-lr1e-4",
        "DiT-wide-2-in-context-lr1e-3", "DiT-deep-8-lr1e-4",  # missing axes: the axis' first value
    ]
    assert s.cells()[-1].train.lr == 1e-4 and s.cells()[-1].block == "adaln-zero"
    assert s.cells()[-2].axes == {"size": "wide", "patch": 2, "block": "in-context", "lr": 1e-3}
    # exclude matches recipe fields that are not axes against the recipe's value
    assert len(spec(grid__exclude=[{"global_batch": 8, "patch": 4}]).cells()) == 2
    assert len(spec(grid__exclude=[{"global_batch": 16}]).cells()) == 4


def test_names_do_not_change_when_cells_are_added_or_removed():
    before = names(spec(grid__recipe={"lr": [1e-4, 3e-4]}))
    after = names(spec(grid__recipe={"lr": [1e-4, 3e-4]}, grid__exclude=[{"size": "wide"}],
                       grid__include=[{"size": "tiny", "patch": 8}]))
    assert after[:4] == before[:4] and after[-1] == "DiT-tiny-8-lr1e-4"


@settings(max_examples=25, deadline=None)
@given(
    patches=st.lists(st.sampled_from([1, 2, 4, 8]), min_size=1, max_size=4, unique=True),
    lrs=st.lists(st.floats(1e-6, 1e-1), min_size=1, max_size=3, unique=True),
    blocks=st.lists(st.sampled_from(["adaln-zero", "adaln", "cross-attention", "in-context"]), min_size=1, max_size=4, unique=True),
)
def test_names_unique_safe_and_one_per_product_cell(patches, lrs, blocks):
    try:
        s = spec(grid__patch=patches, grid__block=blocks, grid__recipe={"lr": lrs})
    except ConfigError as err:  # two lrs that print alike (1e-4 vs 1.0000001e-4) are refused
        assert "duplicate cell name" in str(err) or "listed twice" in str(err)
        return
    got = names(s)
    assert len(got) == len(set(got)) == 2 * len(patches) * len(blocks) * len(lrs)
    for n in got:
        TrialConfig(name=n, train=s.cells()[0].train)  # its name pattern accepts every cell name


# --------------------------------------------------------------------------------------------
# Resources and cost order
# --------------------------------------------------------------------------------------------


def test_resources_by_size():
    s = spec(resources={"workers": 1, "cpus_per_worker": 0.5, "max_failures": 5,
                        "by_size": {"wide": {"workers": 2, "use_gpu": True}}})
    tiny, wide = s.cells()[0], s.cells()[2]
    assert (tiny.workers, tiny.use_gpu, tiny.cpus_per_worker) == (1, False, 0.5)
    assert (wide.workers, wide.use_gpu, wide.gpus_per_worker, wide.cpus_per_worker) == (2, True, 1.0, 0.5)
    t = wide.trial_config("/tmp/x")
    assert (t.name, t.workers, t.use_gpu, t.storage, t.max_failures) == ("DiT-wide-2", 2, True, "/tmp/x", 5)
    assert t.train == wide.train


def test_worker_bundle_is_what_one_worker_asks_ray_for():
    s = spec(resources={"cpus_per_worker": 2, "by_size": {"wide": {"use_gpu": True, "gpus_per_worker": 0.5}}})
    tiny, wide = s.cells()[0], s.cells()[2]
    assert tiny.worker_bundle() == {"CPU": 2.0}
    assert wide.worker_bundle() == {"CPU": 2.0, "GPU": 0.5}
    assert wide.trial_config("runs").worker_bundle() == wide.worker_bundle()  # TrialConfig: the same declaration


def test_order_by_cost_longest_first_and_stable():
    s = spec(resources={"by_size": {"wide": {"workers": 8}}})
    ordered = order_by_cost(s.cells())
    walls = [c.wall_hours for c in ordered]
    assert walls == sorted(walls, reverse=True)
    assert ordered[0].name == "DiT-tiny-2"  # wide-2 has more compute but 8 workers share it
    same = spec(grid__size=[BASE["grid"]["size"][0]], grid__patch=[2], grid__recipe={"seed": [0, 1, 2]})
    assert [c.name for c in order_by_cost(same.cells())] == names(same)


# --------------------------------------------------------------------------------------------
# Errors name the field
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("changes, message", [
    ({"recipe__zero_stage": 5}, "s.yaml: recipe.zero_stage: Input should be less than or equal to 3"),
    ({"recipe__optimizer": "sgd"}, "s.yaml: recipe.optimizer: Extra inputs are not permitted"),
    ({"recipe__steps": DELETE}, "s.yaml: recipe.steps: Field required"),
    ({"recipe__model": "DiT-S/2"}, "s.yaml: recipe.model: Extra inputs are not permitted"),
    ({"grid__patch": [2, 3]}, "s.yaml: grid.patch[1]: 3 does not divide the latent size 8"),
    ({"grid__patch": [2, 2]}, "s.yaml: grid.patch[1]: patch 2 is listed twice"),
    ({"grid__patch": ["x"]}, "s.yaml: grid.patch[0]: Input should be a valid integer"),
    ({"grid__sizes": ["S"]}, "s.yaml: grid.sizes: Extra inputs are not permitted"),
    ({"grid__size": ["XXL"]}, "s.yaml: grid.size[0]: unknown model size 'XXL'"),
    ({"grid__size": [{"name": "odd", "depth": 1, "hidden_size": 30, "num_heads": 4}]},
     "s.yaml: grid.size[0]: hidden_size (30) must be divisible by num_heads (4)"),
    ({"grid__size": [{"name": "half", "depth": 1, "hidden_size": 32}]}, "s.yaml: grid.size[0]: custom size 'half' needs all of"),
    ({"grid__size": [{"name": "S", "depth": 1, "hidden_size": 32, "num_heads": 2}]}, "s.yaml: grid.size[0]: 'S' is the built-in size"),
    ({"grid__block": ["film"]}, "s.yaml: grid.block[0]: Input should be 'adaln-zero', 'adaln'"),
    ({"grid__recipe": {"lr": [1e-4, -1]}}, "s.yaml: grid.recipe.lr[1]: Input should be greater than 0"),
    ({"grid__recipe": {"model": ["DiT-S/2"]}}, "s.yaml: grid.recipe.model: not a recipe field; use grid.size"),
    ({"grid__recipe": {"lrr": [1]}}, "s.yaml: grid.recipe.lrr: not a recipe field"),
    ({"grid__size": [], "grid__patch": []}, "s.yaml: grid: no cells"),
    ({"grid__patch": []}, "s.yaml: grid.patch: required with grid.size"),
    ({"grid__exclude": [{"size": "tiny"}, {"size": "wide"}]}, "s.yaml: grid: no cells"),
    ({"grid__exclude": [{"colour": "red"}]}, "s.yaml: grid.exclude[0].colour: unknown axis"),
    ({"grid__include": [{"size": "tiny"}]}, "s.yaml: grid.include[0].patch: required in an include entry"),
    ({"grid__include": [{"size": "tiny", "patch": 2}]}, "s.yaml: grid.include[0]: duplicate cell name 'DiT-tiny-2' (also from grid)"),
    ({"grid__include": [{"size": "tiny", "patch": 2, "zero_stage": 9}]}, "s.yaml: grid.include[0].zero_stage: Input should be less than"),
    ({"data__manifest": "missing/manifest.json", "data__latent": DELETE},
     "s.yaml: data.manifest: .*/missing/manifest.json does not exist"),
    ({"data__image_size": DELETE, "data__latent": {"channels": 1, "size": 8}}, "s.yaml: data.image_size: required"),
    ({"data__image_size": 16}, "s.yaml: data.latent.vae_factor: 1 x latent 8 != data.image_size 16"),
    ({"resources__workers": 0}, "s.yaml: resources.workers: Input should be greater than or equal to 1"),
    ({"resources__by_size": {"XXL": {"workers": 2}}}, "s.yaml: resources.by_size.XXL: unknown size"),
    ({"resources__by_size": {"wide": {"workers": 3}}},
     "s.yaml: resources.by_size.wide: cell DiT-wide-2: global_batch (8) must be divisible by workers (3)"),
    ({"name": "my study"}, "s.yaml: name: String should match pattern"),
    ({"eval__sampler": "euler"}, "s.yaml: eval.sampler: Input should be 'ddpm' or 'ddim'"),
    ({"cost__gpu_hour_tflops": 0}, "s.yaml: cost.gpu_hour_tflops: Input should be greater than 0"),
    # Absurd values are refused by the schema, not by torch (or an endless build) when Gflops are measured.
    ({"grid__size": [{"name": "deep", "depth": 10**6, "hidden_size": 32, "num_heads": 2}]},
     "s.yaml: grid.size[0].depth: Input should be less than or equal to 1024"),
    ({"grid__size": [{"name": "wide", "depth": 1, "hidden_size": 2**40, "num_heads": 2}]},
     "s.yaml: grid.size[0].hidden_size: Input should be less than or equal to 65536"),
    ({"data__num_classes": 10**18}, "s.yaml: data.num_classes: Input should be less than or equal to 1000000"),
    ({"data__latent": {"channels": 10**18, "size": 8, "vae_factor": 1}},
     "s.yaml: data.latent.channels: Input should be less than or equal to 1024"),
    ({"recipe__steps": 2**63}, "s.yaml: recipe.steps: integer out of range"),
    ({"grid__recipe": {"seed": [0, -(2**64)]}}, "s.yaml: grid.recipe.seed[1]: integer out of range"),
    ({"recipe__lr": float("inf")}, "s.yaml: recipe.lr: inf is not a finite number"),
    ({"recipe__lr": "1e999"}, "s.yaml: recipe.lr: Input should be a finite number"),
    ({"grid__recipe": {"lr": ["1e999"]}}, "s.yaml: grid.recipe.lr[0]: Input should be a finite number"),
    ({"resources__cpus_per_worker": "1e999"}, "s.yaml: resources.cpus_per_worker: Input should be a finite number"),
    ({"eval__cfg_scale": "nan"}, "s.yaml: eval.cfg_scale: Input should be a finite number"),
])
def test_errors_name_the_field(changes, message):
    with pytest.raises(ConfigError) as info:
        spec(**changes)
    # plain prefix of one line; ".*" marks the one pattern with a machine-dependent part
    pattern = ".*".join(re.escape(part) for part in message.split(".*"))
    assert any(re.match(pattern, line) for line in str(info.value).splitlines()), str(info.value)


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as info:
        spec(recipe__zero_stage=5, resources__workers=0)
    assert len(str(info.value).splitlines()) == 2


def test_file_level_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read study spec"):
        load_spec(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_spec(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: \(top level\): expected a mapping"):
        load_spec(bad)


def test_relative_manifest_resolves_against_the_spec_folder(tmp_path, digits8):
    folder = tmp_path / "specs"
    folder.mkdir()
    (tmp_path / "data").symlink_to(Path(digits8).parent)
    raw = copy.deepcopy(BASE)
    raw["data"] = {"manifest": "../data/manifest.json"}
    (folder / "s.yaml").write_text(yaml.safe_dump(raw))
    s = load_spec(folder / "s.yaml")
    assert s.data_info.exists and s.data_info.manifest == str(tmp_path / "data" / "manifest.json")
    assert s.cells()[0].train.data == s.data_info.manifest


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def test_cli_flops_spec_table_and_json(capsys):
    assert cli(["flops", str(ROOT / "studies" / "demo.yaml")]) == 0
    out = capsys.readouterr().out
    for name in ("DiT-xs-8", "DiT-m-2", "total", "GPU-h", "train flops"):
        assert name in out
    assert cli(["flops", str(ROOT / "studies" / "demo.yaml"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [c["name"] for c in data["cells"]][:2] == ["DiT-xs-8", "DiT-xs-4"]
    assert data["cells"][0]["tokens"] == 4 and data["total"]["cells"] == 9


def test_cli_flops_paper_spec_prints_the_paper_gflops(capsys):
    assert cli(["flops", str(ROOT / "studies" / "dit_paper_256.yaml")]) == 0
    out = capsys.readouterr().out
    for g in ("6.06", "23.01", "80.71", "118.64", "0.36"):
        assert f" {g} " in out


def test_cli_flops_bad_spec(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    raw = copy.deepcopy(BASE)
    raw["recipe"]["zero_stage"] = 4
    bad.write_text(yaml.safe_dump(raw))
    assert cli(["flops", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: recipe.zero_stage: Input should be less than or equal to 3" in err
    assert "Traceback" not in err
    assert cli(["flops", str(tmp_path / "missing.yml")]) == 2
    assert "cannot read study spec" in capsys.readouterr().err
    assert cli(["flops", str(ROOT / "studies" / "demo.yaml"), "--image-size", "64"]) == 2
    assert "--image-size" in capsys.readouterr().err
    assert cli(["flops", str(ROOT / "studies" / "demo.yaml"), "DiT-S/2"]) == 2


def test_cli_schema(tmp_path, capsys):
    assert cli(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema == spec_json_schema()
    assert {"name", "data", "grid", "recipe", "eval", "resources", "tracking", "storage", "cost"} <= set(schema["properties"])
    assert schema["additionalProperties"] is False
    recipe = schema["$defs"]["Recipe"]["properties"]
    assert recipe["zero_stage"]["maximum"] == 3 and "model" not in recipe
    assert cli(["schema", "--out", str(tmp_path / "s.json")]) == 0
    assert json.loads((tmp_path / "s.json").read_text()) == schema


def test_schema_accepts_the_shipped_studies():
    jsonschema = pytest.importorskip("jsonschema")
    schema = spec_json_schema()
    for path in STUDIES:
        jsonschema.validate(yaml.safe_load(path.read_text()), schema)


def test_cell_is_a_frozen_value():
    c = spec().cells()[0]
    assert isinstance(c, Cell)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.name = "x"  # type: ignore[misc]


# --------------------------------------------------------------------------------------------
# Limits: an absurd spec is refused before anything is built
# --------------------------------------------------------------------------------------------


def test_a_million_cell_grid_is_refused_in_milliseconds_naming_the_limit():
    import time

    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        spec(grid__size=[BASE["grid"]["size"][0]], grid__patch=[2],
             grid__recipe={"lr": [1e-4 * (1 + i) for i in range(1000)], "seed": list(range(1000))})
    assert time.perf_counter() - t0 < 2
    message = str(info.value)
    assert message.startswith("s.yaml: grid: 1,000,000 cells (")
    assert "grid.recipe.lr 1,000 x grid.recipe.seed 1,000" in message
    assert "exceed grid.max_cells = 1,000; raise grid.max_cells" in message


def test_max_cells_counts_include_and_each_axis_and_can_be_raised():
    with pytest.raises(ConfigError, match=r"s.yaml: grid: 5 cells .* \+ grid.include 1\) exceed grid.max_cells = 4"):
        spec(grid__max_cells=4, grid__include=[{"size": "B", "patch": 2}])
    assert len(spec(grid__max_cells=5, grid__include=[{"size": "B", "patch": 2}]).cells()) == 5
    # An axis past the limit is refused even when another is empty and the product is 0.
    with pytest.raises(ConfigError, match=r"s.yaml: grid.recipe.seed: 1,001 entries, more than grid.max_cells"):
        spec(grid__size=[], grid__patch=[], grid__include=[{"size": "tiny", "patch": 2}],
             grid__recipe={"seed": list(range(1001))})
    with pytest.raises(ConfigError, match=r"s.yaml: grid.max_cells: Input should be greater than or equal to 1"):
        spec(grid__max_cells=0)


def test_max_cells_is_a_guard_not_part_of_the_study():
    # The resolved spec (whose hash a study folder checks on resume) is the same with the limit
    # raised, and the same as before the field existed.
    assert spec(grid__max_cells=10_000).resolved(costs=False) == spec().resolved(costs=False)
    assert "max_cells" not in spec().resolved(costs=False)["spec"]["grid"]
    assert "max_cells" in spec_json_schema()["$defs"]["Grid"]["properties"]


def test_duplicate_axis_values_are_found_in_linear_time():
    import time

    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"s.yaml: grid.recipe.seed\[60000\]: value 0 is listed twice"):
        spec(grid__size=[], grid__patch=[], grid__max_cells=100_000, grid__include=[{"size": "tiny", "patch": 2}],
             grid__recipe={"seed": [*range(60_000), 0]})
    assert time.perf_counter() - t0 < 5  # comparing each value with every earlier one: ~40 s


# --------------------------------------------------------------------------------------------
# eval.features "module:factory": user code, imported only for a run
# --------------------------------------------------------------------------------------------


def test_a_features_factory_is_imported_only_when_loading_for_a_run(tmp_path, digits8, monkeypatch, capsys):
    import sys

    module = f"ditscale_test_features_{tmp_path.name.replace('-', '_')}"
    marker = tmp_path / "imported"
    (tmp_path / f"{module}.py").write_text(
        f"open({str(marker)!r}, 'w').close()  # the side effect of running user code\n"
        "def factory(**kwargs):\n    raise AssertionError('not built at load')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    raw = {**copy.deepcopy(BASE), "data": {"manifest": digits8},
           "eval": {"enabled": True, "features": f"{module}:factory"}}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    try:
        assert cli(["flops", str(path)]) == 0, capsys.readouterr().err
        assert cli(["status", str(path), "--storage", str(tmp_path / "runs")]) == 0, capsys.readouterr().err
        load_spec(path)
        assert not marker.exists()
        load_spec(path, for_run=True)
        assert marker.exists()
        raw["eval"]["features"] = f"{module}:no_such_factory"
        path.write_text(yaml.safe_dump(raw))
        load_spec(path)
        with pytest.raises(ConfigError, match=r"s.yaml: eval.features: .*cannot import 'no_such_factory' from "):
            load_spec(path, for_run=True)
    finally:
        sys.modules.pop(module, None)
