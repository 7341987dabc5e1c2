"""The code base's layout promises (docs/design.md, "Where things are"): a policy lives in one place,
no unit grows past what one reader holds in mind without saying why, and nothing imports in a circle.
"""

from __future__ import annotations

import argparse
import ast
import re

import pytest

from helpers import REPO

from slicemoe_gguf.cache_params import policies, settings

NATIVE = REPO / "native" / "src"
PACKAGE = REPO / "slicemoe_gguf"
MAX_LINES = 500


def _units():
    return sorted(NATIVE.glob("*.cpp")) + sorted(NATIVE.glob("*.h")) + sorted(PACKAGE.glob("*.py"))


def test_no_unit_is_past_500_lines_without_its_reason_at_the_top():
    too_long = []
    for path in _units():
        lines = path.read_text().splitlines()
        head = "\n".join(lines[:30])
        if len(lines) > MAX_LINES and "past 500 lines" not in head.lower():
            too_long.append(f"{path.relative_to(REPO)}: {len(lines)} lines")
    assert not too_long, too_long


def test_a_policy_is_named_only_in_its_table_and_the_engine_never_asks_which_one_runs():
    names = set(policies())
    assert {"dbsc", "lru8", "belady", "adapmoe"} <= names
    for path in sorted(NATIVE.glob("*.[ch]*")):
        text = path.read_text()
        if path.name.startswith("slicemoe-policy."):
            continue
        quoted = {name for name in names if f'"{name}"' in text}
        assert not quoted, f"{path.name} spells policy names {quoted}: they belong to slicemoe-policy.cpp"
        # the default of the parameter structs is the only place a policy id may appear
        ids = re.findall(r"(?<!= )SLICEMOE_POLICY_[A-Z_0-9]+", text)
        assert not ids, f"{path.name} tests policy ids {ids}: ask the policy's hooks instead"


def _module_imports(path) -> set[str]:
    """The package modules a module imports when it is imported (function-level imports excluded)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found |= {alias.name for alias in node.names}
    return found & {p.stem for p in PACKAGE.glob("*.py")}


def test_no_module_of_the_package_imports_itself_in_a_circle():
    graph = {path.stem: _module_imports(path) for path in PACKAGE.glob("*.py")}
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> None:
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", " -> ".join(trail + [module])
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            visit(target, trail + [module])
        state[module] = "done"

    for module in sorted(graph):
        visit(module, [])


def test_every_engine_setting_is_one_flag_of_slicemoe_run_with_the_engines_default():
    from slicemoe_gguf._native import lib
    from slicemoe_gguf.cache_params import settings
    from slicemoe_gguf.cli import build_parser

    table = settings()
    parser = build_parser()
    run = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["run"]
    args = parser.parse_args(["run", "-m", "x", "-p", "y"])
    engine = lib().slicemoe_model_default_params()
    assert table["cache_budget"]["default"] == engine.cache.budget_bytes == 0
    assert table["policy"]["default"] == "dbsc" and table["high_threshold"]["default"] == engine.cache.high_threshold
    for name, setting in table.items():
        if not setting["flag"]:
            continue   # record_trace: the `slicemoe trace` command
        assert setting["flag"] in run.format_help(), name
        value = getattr(args, name)
        if setting["kind"] == "size":
            assert value is None   # no cache unless asked for
        else:
            assert value == setting["default"], name


def test_a_number_out_of_the_tables_range_is_refused_by_the_engine_with_that_range():
    from slicemoe_gguf import Model, SliceMoEError
    from slicemoe_gguf.cache_params import range_text, settings
    from slicemoe_gguf.embedded import embedded_gguf

    path = embedded_gguf(progress=False)
    numbers = {name: s for name, s in settings().items() if s["kind"] == "number"}
    assert {"high_threshold", "max_miss_rate", "gating_t"} <= set(numbers)
    for name, setting in numbers.items():
        above = setting["max"] if setting["max_open"] else setting["max"] * 2 + 1
        with pytest.raises(SliceMoEError, match=re.escape(f"{name} must be in {range_text(setting)}")):
            Model(path, cache_budget=1 << 30, **{name: above})


def test_slicemoe_settings_prints_the_engines_table_with_its_defaults():
    import json
    import subprocess

    as_json = subprocess.run(["slicemoe", "settings", "--json"], capture_output=True, text=True, timeout=120)
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout) == settings()
    table = subprocess.run(["slicemoe", "settings"], capture_output=True, text=True, timeout=120)
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
            for line in table.stdout.splitlines()[2:]}
    assert set(rows) == set(settings())
    assert rows["policy"][3:5] == ["dbsc / lru8 / lfu8 / lru4 / belady / hobbit / dymoe / cache_prior / adapmoe", "dbsc"]
    assert rows["high_threshold"][3:5] == ["[0, 1]", "0.25"]
    assert rows["max_miss_rate"][2] == "`SLICEMOE_MAX_MISS_RATE`" and rows["max_miss_rate"][3] == "[0, 1)"
