"""One point of the fleet curve: wall time of `salt '*' state.apply
shadowsocks.tuning` (a re-run: idempotent, no changes) next to `salt '*'
state.apply fleet.empty` (an empty SLS) with FLEET_CURVE_SIZE minions.

bench/fleet_curve runs this module once per fleet size (a fleet of its own
each time: the harness's fleet is module-scoped); pytest skips it unless
FLEET_CURVE=1. The minions are those of the harness (conftest.py), each in
its own network namespace with every path the package writes in a sandbox
(TuningSandbox: no service restarted, nothing under /etc written).

Environment: FLEET_CURVE_SIZE (minions, default 3), FLEET_CURVE_RUNS
(repetitions, default 3), FLEET_CURVE_JSON (file the point is added to).
"""

import json
import os
import statistics
import time
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.fleet_sources("repo", extra_sls={"fleet/empty.sls": ""}),
    pytest.mark.skipif(os.environ.get("FLEET_CURVE") != "1", reason="set FLEET_CURVE=1 (bench/fleet_curve)"),
]


@pytest.fixture(scope="module")
def fleet_size():
    return int(os.environ.get("FLEET_CURVE_SIZE", "3"))


@pytest.fixture(scope="module")
def fleet_minion_overrides(fleet_minion_ids, fleet_tuning_sandbox):
    return {mid: fleet_tuning_sandbox(mid).opts for mid in fleet_minion_ids}


@pytest.fixture(scope="module")
def fleet_pillar(fleet_minion_ids, fleet_tuning_sandbox):
    return {mid: fleet_tuning_sandbox(mid).pillar() for mid in fleet_minion_ids}


def test_fleet_curve_point(fleet_salt_cli, fleet_synced, fleet_minion_ids):
    runs = int(os.environ.get("FLEET_CURVE_RUNS", "3"))
    records = []

    def timed(kind, sls):
        start = time.perf_counter()
        ret = fleet_salt_cli.run("state.apply", sls, minion_tgt="*")
        wall = time.perf_counter() - start
        # an empty SLS returns nothing, and salt exits 1 for it: its time still counts
        assert ret.returncode == 0 or sls == "fleet.empty", ret
        assert isinstance(ret.data, dict) and set(ret.data) == set(fleet_minion_ids), ret
        if kind:
            records.append({"kind": kind, "wall_s": wall})
        return ret

    # The first apply writes every sandbox (not timed: the curve is the re-run).
    first = timed(None, "shadowsocks.tuning")
    assert all(any(r["changes"] for r in states.values()) for states in first.data.values()), first
    for _ in range(runs):
        rerun = timed("rerun", "shadowsocks.tuning")
        assert not any(r["changes"] for states in rerun.data.values() for r in states.values()), rerun
        timed("empty", "fleet.empty")

    size = len(fleet_minion_ids)
    walls = {kind: [r["wall_s"] for r in records if r["kind"] == kind] for kind in ("rerun", "empty")}
    point = {"minions": size, "runs": runs,
             "median": {kind: statistics.median(v) for kind, v in walls.items()},
             "min": {kind: min(v) for kind, v in walls.items()},
             "max": {kind: max(v) for kind, v in walls.items()},
             "records": records}
    out = os.environ.get("FLEET_CURVE_JSON")
    if out:
        data = json.loads(Path(out).read_text()) if Path(out).exists() else {}
        data[str(size)] = point
        Path(out).write_text(json.dumps(data, indent=1))
    print(f"\nCURVE {size} minion(s): re-run {point['median']['rerun']:.2f}s, empty {point['median']['empty']:.2f}s")
