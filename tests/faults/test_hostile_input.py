"""Fault 7: hostile or broken input never yields a traceback; only clear errors with exit 2.

Exit 2 is the CLI's answer to a ``ConfigError`` (bad input, the message names the field or
file); anything else is exit 1, a defect of ours. So bad input must give 2, never 1.
"""

import os
import random
import string
import time
import tracemalloc

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from dit.errors import ConfigError
from orchestrator.cli import main as cli
from orchestrator.spec import load_spec, parse_spec

FIELDS = ["name", "data", "grid", "recipe", "eval", "resources", "tracking", "storage", "cost", "description",
          "size", "patch", "block", "steps", "global_batch", "lr", "zero_stage", "precision", "manifest",
          "workers", "by_size", "include", "exclude", "latent", "image_size", "num_classes", "max_cells", "depth"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.integers(-2**70, 2**70),
                    st.sampled_from([2**63, -2**63 - 1, 10**400, 2**62]), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["S", "XL", "DiT-S/2", "bf16", "fp8", "-1", "", "../x",
                                                           "1e999", "nan", "-inf"]))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), inner, max_size=5)),
    max_leaves=20)

VALID = {"name": "fuzz", "data": {"manifest": "m.json", "image_size": 8, "num_classes": 10,
                                  "latent": {"channels": 1, "size": 8, "vae_factor": 1}},
         "grid": {"size": [{"name": "t", "depth": 2, "hidden_size": 64, "num_heads": 4}], "patch": [2]},
         "recipe": {"steps": 4}}
SECTIONS = ["name", "description", "data", "grid", "recipe", "eval", "resources", "tracking", "storage", "cost"]
NOT_A_MAPPING = [5, "x", [1], True, None, 2**63]
NOT_A_STRING = [5, [1], {"a": 1}, True, 2**63]


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.dictionaries(st.sampled_from(FIELDS), values, max_size=8))
def test_random_specs_only_raise_config_errors(raw):
    try:
        spec = parse_spec(raw, source="fuzz.yaml", base_dir="/nonexistent")
        spec.cells()
    except ConfigError:
        pass


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(["name", "data", "grid", "recipe", "resources", "storage"]), values)
def test_one_corrupted_field_of_a_valid_spec_is_named(field, value):
    raw = {**VALID, field: value}
    try:
        parse_spec(raw, source="fuzz.yaml", base_dir="/nonexistent").cells()
    except ConfigError as err:
        assert "fuzz.yaml" in str(err)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=600) | st.text(max_size=300).map(str.encode))
def test_random_spec_files_only_raise_config_errors(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("bytes") / "s.yaml"
    path.write_bytes(data)
    try:
        load_spec(path).cells()
    except ConfigError as err:
        assert str(err).startswith(f"{path}: ")


# Files each command line's folder holds: broken specs and trial configs (see HOSTILE below).
BROKEN_FILES = {"bytes.yaml": b"\xff\xfe\x00name", "deep.yaml": b"name: " + b"[" * 10**4 + b"]" * 10**4,
                "date.yaml": b"name: 2001-02-30\n", "digits.yaml": b"recipe: {steps: " + b"9" * 5000 + b"}\n",
                "inf.yaml": b"name: x\nrecipe: {lr: -.inf}\n", "cycle.yaml": b"name: &a {b: *a}\n",
                "dir.yaml": None}

argv_tokens = st.one_of(
    # `flops` with no model and `prepare digits` do real (valid) work, so they are left out here;
    # their bad-input paths have their own tests.
    st.sampled_from(["run", "resume", "status", "cancel", "train", "export", "evaluate", "prepare", "schema",
                     "report", "--json", "--storage", "--image-size", "--tracking-uri", "--workers", "--address",
                     "--out", "--spec", "-h", "DiT-Q/2", "studies/nope.yaml", "/dev/null", "0", "-5",
                     "pipe:rm -rf /", *BROKEN_FILES]),
    st.text(alphabet=string.printable, max_size=10),
)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(argv_tokens, min_size=1, max_size=5))
@example(["status", "date.yaml"])
@example(["run", "deep.yaml"])
@example(["train", "bytes.yaml"])
@example(["train", "cycle.yaml"])
@example(["cancel", "digits.yaml"])
@example(["flops", "inf.yaml"])
@example(["evaluate", "x.pt", "--spec", "dir.yaml"])
def test_random_command_lines_exit_cleanly(tmp_path_factory, capsys, argv):
    # Commands that would do real work on valid input never get any here: every path is
    # missing or broken, so the answer is 0 (help, schema) or 2 (usage or bad input, in one
    # message), never 1 (an exception that is not a ConfigError: a defect on bad input).
    cwd = os.getcwd()
    folder = tmp_path_factory.mktemp("cli")
    for name, data in BROKEN_FILES.items():
        (folder / name).mkdir() if data is None else (folder / name).write_bytes(data)
    os.chdir(folder)
    try:
        code = cli(argv)
    except SystemExit as exit_:  # argparse: --help exits 0, bad usage exits 2
        code = exit_.code
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err
    assert code in (0, 2), (argv, code, err)
    assert "Traceback" not in err, (argv, err)
    if code == 2:
        assert "error:" in err or "usage:" in err, (argv, err)


# --------------------------------------------------------------------------------------------
# Hostile spec files: `ditscale flops SPEC` says exit 2, names the file and field, fast
# --------------------------------------------------------------------------------------------


def billion_laughs(levels: int = 9, width: int = 9) -> str:
    """levels anchors, each a list of width aliases of the one before: width^levels values in 1 KB."""
    lines = [f"a0: &a0 [{', '.join(['lol'] * width)}]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join([*lines, f"name: *a{levels - 1}", ""])


def _flops(path, capsys) -> tuple[int, str]:
    t0 = time.perf_counter()
    code = cli(["flops", str(path)])
    assert time.perf_counter() - t0 < 2, "bad input must be refused before anything is built"
    err = capsys.readouterr().err
    assert "Traceback" not in err and "failed:" not in err, err
    return code, err


def _yaml_of(raw) -> str:
    return yaml.safe_dump(raw, width=10**6)


HOSTILE = {
    "random bytes": (lambda: random.Random(7).randbytes(4000), "not a UTF-8 text file"),
    "nul bytes": (lambda: b"name: x\0y\n", "not valid YAML"),
    "10^5 nested lists": (lambda: ("name: " + "[" * 10**5 + "]" * 10**5).encode(),
                          "line 1: nested deeper than 64 levels"),
    "10^5 nested mappings": (lambda: ("name: " + "{a: " * 10**5 + "1" + "}" * 10**5).encode(),
                             "line 1: nested deeper than 64 levels"),
    "billion laughs": (lambda: billion_laughs().encode(), "a6: expands to more than 1,000,000 values"),
    "an alias inside its anchor": (lambda: b"name: &a [x, *a]\n", "name[1]: refers to a value that contains it"),
    "a 5,000-digit integer": (lambda: ("name: x\nrecipe: {steps: " + "9" * 5000 + "}\n").encode(),
                              "not valid YAML: a value cannot be read (Exceeds the limit"),
    "an impossible date": (lambda: b"name: 2001-02-30\n",
                           "not valid YAML: a value cannot be read (day is out of range"),
    "a 2 MiB file": (lambda: b"# " + b"x" * 2 * 2**20, "larger than 1 MiB"),
    "an empty file": (lambda: b"", "(top level): expected a mapping"),
    "a list": (lambda: b"- name: x\n", "(top level): expected a mapping"),
    "null everywhere": (lambda: _yaml_of({k: None for k in SECTIONS}).encode(), "name: Input should be a valid string"),
    "nested nulls": (lambda: _yaml_of({**VALID, "data": {k: None for k in VALID["data"]},
                                       "grid": {"size": [None], "patch": [None], "recipe": None, "include": [None]},
                                       "recipe": {"steps": None, "lr": None}}).encode(),
                     "data.manifest: Input should be a valid string"),
    "steps 2^63": (lambda: _yaml_of({**VALID, "recipe": {"steps": 2**63}}).encode(),
                   "recipe.steps: integer out of range"),
    "steps 10^400": (lambda: _yaml_of({**VALID, "recipe": {"steps": 10**400}}).encode(),
                     "recipe.steps: integer out of range"),
    "lr 1.0e999": (lambda: _yaml_of({**VALID, "recipe": {"steps": 4, "lr": 1.0e999}}).encode(),
                   "recipe.lr: inf is not a finite number"),
    "lr .nan": (lambda: _yaml_of({**VALID, "recipe": {"steps": 4, "lr": float("nan")}}).encode(),
                "recipe.lr: nan is not a finite"),
    "lr '1e999'": (lambda: _yaml_of({**VALID, "recipe": {"steps": 4, "lr": "1e999"}}).encode(),
                   "recipe.lr: Input should be a finite number"),
    "depth 10^9": (lambda: _yaml_of({**VALID, "grid": {"size": [{"name": "t", "depth": 10**9, "hidden_size": 64,
                                                                 "num_heads": 4}], "patch": [2]}}).encode(),
                   "grid.size[0].depth: Input should be less than or equal to 1024"),
    "a million cells": (lambda: _yaml_of({**VALID, "grid": {**VALID["grid"], "recipe": {
        "lr": [1e-4 + i * 1e-7 for i in range(1000)], "seed": list(range(1000))}}}).encode(),
                        "grid: 1,000,000 cells"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_spec_files_exit_2_naming_the_file_and_field(tmp_path, capsys, case):
    make, message = HOSTILE[case]
    path = tmp_path / "s.yaml"
    path.write_bytes(make())
    code, err = _flops(path, capsys)
    assert code == 2 and err.startswith(f"ditscale flops: error: {path}: "), err
    assert message in err, err


@pytest.mark.parametrize("section", SECTIONS)
def test_a_wrong_type_for_any_section_is_named(tmp_path, capsys, section):
    path = tmp_path / "s.yaml"
    wrong = NOT_A_STRING if section in ("name", "description", "storage") else NOT_A_MAPPING
    for value in wrong:
        path.write_text(_yaml_of({**VALID, section: value}))
        code, err = _flops(path, capsys)
        assert code == 2, (value, err)
        assert f"{path}: {section}: " in err, (value, err)


def test_a_spec_path_that_is_no_readable_file_exits_2(tmp_path, capsys):
    (tmp_path / "folder.yaml").mkdir()
    (tmp_path / "file").write_text("x")
    for path in (tmp_path / "folder.yaml", tmp_path / "file" / "s.yaml", tmp_path / "missing.yaml"):
        code, err = _flops(path, capsys)
        assert code == 2 and f"{path}: cannot read study spec" in err, err


def test_an_endless_stream_as_spec_is_refused():
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="/dev/zero: larger than 1 MiB"):
        load_spec("/dev/zero")  # read whole, it would never end
    assert time.perf_counter() - t0 < 2


def test_an_alias_bomb_is_refused_in_bounded_time_and_memory(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(billion_laughs())  # 9^9 = 387 million values
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(ConfigError, match=r"bomb.yaml: a6: expands to more than 1,000,000 values"):
            load_spec(path)
        elapsed = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < 2 and peak < 20 * 2**20, (elapsed, peak)
    # Passed in already parsed (the structure shares its lists as the aliases do), the same.
    with pytest.raises(ConfigError, match="expands to more than"):
        parse_spec(yaml.safe_load(billion_laughs()), source="bomb.yaml")


def test_deep_nesting_passed_in_already_parsed_is_refused():
    deep: list = []
    for _ in range(10**5):
        deep = [deep]
    with pytest.raises(ConfigError, match=r"s.yaml: name(\[0\])+: nested deeper than 64 levels"):
        parse_spec({**VALID, "name": deep}, source="s.yaml")
    cyclic: list = []
    cyclic.append(cyclic)
    with pytest.raises(ConfigError, match=r"s.yaml: grid.recipe.lr\[0\]: refers to a value that contains it"):
        parse_spec({**VALID, "grid": {**VALID["grid"], "recipe": {"lr": cyclic}}}, source="s.yaml")


def test_yaml_is_loaded_safely(tmp_path, capsys):
    marker = tmp_path / "pwned"
    spec = tmp_path / "evil.yaml"
    spec.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    assert cli(["run", str(spec)]) == 2
    assert not marker.exists()
    assert "evil.yaml" in capsys.readouterr().err
