"""The benchmarks in bench/ run, in a reduced form: they finish, print their
tables with numbers, write their JSON, and leave no network namespace or temp
dir behind. No timing is asserted: a busy machine must not fail the suite."""

import json
import pathlib
import re
import subprocess
import sys

import pytest

from support.common import REPO

NUMBER = r"[0-9]+\.[0-9]+"


def run_bench(name, tmp_path, *args, timeout):
    out = tmp_path / f"{name}.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / name), *args, "--json", str(out)],
        capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout, json.loads(out.read_text())


def temp_dirs():
    return set(pathlib.Path("/var/tmp").glob("sst-*"))


def own_namespaces():
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in listing.splitlines() if line.startswith("sstb-")]


@pytest.mark.slow
def test_apply_cost_runs_and_prints_its_table(tmp_path):
    before, dirs = own_namespaces(), temp_dirs()
    stdout, data = run_bench("apply_cost", tmp_path, "--runs", "1", timeout=600)

    for label in ("tuned: first apply", "tuned: re-run", "stock sysctl.present", "empty SLS"):
        assert re.search(rf"^{re.escape(label)}\s+\d+\s+{NUMBER}\s+(?:{NUMBER}|-)\s+{NUMBER}", stdout, re.M), (label, stdout)
    # The targets of the spine issue: all states against stock, CPU against an empty SLS.
    for check in ("first apply: all states / stock states", "re-run: all states / stock states",
                  "first apply: CPU of salt-call over empty SLS", "re-run: CPU of salt-call over empty SLS"):
        assert re.search(rf"^{re.escape(check)}\s+[-+]?{NUMBER}%?\s+<= \S+\s+(MET|MISSED)", stdout, re.M), (check, stdout)

    assert data["runs"] == 1
    assert {r["kind"] for r in data["records"]} == {"first", "rerun", "stock", "empty"}
    assert data["stock_keys"] and not any(k.startswith("fs.") for k in data["stock_keys"])
    assert data["medians"]["stock"]["state_ms"] > 0
    assert data["medians"]["first"]["sysctl_ms"] > 0
    assert own_namespaces() == before, "apply_cost left a network namespace behind"
    assert not temp_dirs() - dirs, "apply_cost left its temp dir behind"


def test_module_speed_runs_and_prints_its_table(tmp_path):
    dirs = temp_dirs()
    stdout, data = run_bench("module_speed", tmp_path, "--runs", "3", "--top", "3", timeout=300)

    for name in ("get", "probe", "get + probe", "set all", "apply first", "apply re-run"):
        assert re.search(rf"^{re.escape(name)}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}", stdout, re.M), (name, stdout)
    for name in ("get", "probe", "set all"):
        assert re.search(rf"^{re.escape(name)}\s.*\s(MET|MISSED)\s", stdout, re.M), (name, stdout)
    assert "where the time goes: apply first" in stdout
    assert data["results"]["set all"]["median_ms"] > 0
    assert data["results"]["apply first"]["n"] >= 1
    assert not temp_dirs() - dirs, "module_speed left its temp dir behind"
