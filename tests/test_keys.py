"""The key layout is defined once (emp_hub/broker/keys.py): the scripts, the Python code
and docs/broker.md follow it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from emp_hub.broker.keys import LAYOUT, Keys, lua_layout
from emp_hub.broker.scripts import NAMES, source

ROOT = Path(__file__).resolve().parents[1]


def test_keys_are_built_from_the_layout() -> None:
    keys = Keys("emp")
    assert keys("leases") == "{emp}:leases"
    assert keys("job", "j1") == "{emp}:job:j1"
    assert keys("idempotency", "tok", "k") == "{emp}:idem:tok:k"
    with pytest.raises(TypeError, match="takes 1 argument"):
        keys("job")


def test_the_lua_layout_matches_the_python_one() -> None:
    lua = lua_layout()
    assert "K.leases = P .. 'leases'" in lua
    assert "K.job = function(a0) return P .. 'job:' .. a0 end" in lua
    assert "K.idempotency = function(a0, a1) return P .. 'idem:' .. a0 .. ':' .. a1 end" in lua
    assert all(source(name).index("local K = {}") < source(name).index("K.") for name in NAMES)


def test_no_script_or_module_spells_a_key_of_its_own() -> None:
    for script in (ROOT / "emp_hub" / "broker" / "lua").glob("*.lua"):
        assert "P .." not in script.read_text(), f"{script.name} builds a key by hand"
    for module in (ROOT / "emp_hub").rglob("*.py"):
        if module.name != "keys.py":
            assert not re.search(r"\"\{\" \+", module.read_text()), f"{module} builds a prefix"


def test_docs_describe_every_key() -> None:
    table = (ROOT / "docs" / "broker.md").read_text()
    for name, pattern in LAYOUT.items():
        shown = pattern.replace("{}", "<")  # `job:<id>`, `idx:status:<s>`, ...
        assert f"`{shown.split('<')[0]}" in table, f"docs/broker.md does not describe {name}"


def test_a_script_carries_only_the_helpers_and_keys_it_uses() -> None:
    depth, submit = source("depth"), source("submit")
    # depth.lua uses CFG and K.queue, nothing else of the prelude.
    assert "local CFG = {}" in depth and "K.queue = function" in depth
    assert "local function claim_jobs" not in depth and "K.leases" not in depth
    # submit.lua calls claim_jobs, which calls take's helpers (fair_claimed, set_status):
    # they come along, each once, before their first use.
    for helper in ("claim_jobs", "fair_claimed", "set_status", "affinity_pick", "lease_end"):
        assert submit.count(f"local function {helper}(") == 1, helper
    assert submit.index("local function fair_claimed(") < submit.index("fair_claimed(j)")
    assert "local function dead_letter(" not in submit and "K.dead =" not in submit
    assert "K.leases = P .. 'leases'" in submit  # used by claim_jobs only
