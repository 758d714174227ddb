"""The diagnosis engine as plain functions: parsing the kernel's counter
files, the baseline kept between calls, the delta and severity rules, and
the beacon's config check and only-on-change rule."""

import importlib.util
import json
import os

import pytest

import sstuning_diagnose as diagnose
from support.common import REPO

NETSTAT = """\
TcpExt: SyncookiesSent SyncookiesRecv ListenOverflows ListenDrops TCPTimeWaitOverflow TCPMemoryPressures TCPAbortOnMemory TCPFastOpenActiveFail TCPFastOpenBlackhole
TcpExt: 0 0 7 9 0 1 0 2 0
IpExt: InNoRoutes InTruncatedPkts
IpExt: 0 3
MPTcpExt: MPCapableSYNRX
"""
SNMP = """\
Ip: Forwarding DefaultTTL
Ip: 2 64
Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors IgnoredMulti MemErrors
Udp: 2350 0 4 2352 3 0 1 0 0
"""
SOCKSTAT = """\
sockets: used 14
TCP: inuse 3 orphan 0 tw 4 alloc 3 mem 120
UDP: inuse 0 mem 0
FRAG: inuse 0 memory 0
"""


def load_beacon():
    spec = importlib.util.spec_from_file_location("sstuning_test_beacon", REPO / "_beacons" / "shadowsocks_tuning.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def a_sample(**changes):
    data = {
        "version": 1, "time": 1000.0, "boot_id": "b", "netns": "net:[1]",
        "counters": {"TcpExt:ListenOverflows": 7, "Udp:RcvbufErrors": 0},
        "fds": {"42": {"name": "ss-server", "parent": None, "open": 100, "soft": 1024, "hard": 1024}},
        "file_nr": [500, 0, 100000], "tcp_mem": [1000, 2000, 3000], "tcp_mem_pages": 10, "conntrack": None,
    }
    data.update(changes)
    return data


def by_id(found):
    return {f["condition"]: f for f in found}


# --------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------
def test_netstat_and_snmp_pairs_are_read_by_name():
    netstat = diagnose.parse_pairs(NETSTAT)
    assert netstat["TcpExt"]["ListenOverflows"] == 7 and netstat["TcpExt"]["ListenDrops"] == 9
    assert netstat["IpExt"] == {"InNoRoutes": 0, "InTruncatedPkts": 3}
    assert "MPTcpExt" not in netstat  # a header without its values line is skipped
    udp = diagnose.parse_pairs(SNMP)["Udp"]
    assert (udp["RcvbufErrors"], udp["SndbufErrors"], udp["InErrors"]) == (3, 0, 4)


def test_the_real_proc_files_parse():
    for name in ("netstat", "snmp"):
        with open(f"/proc/net/{name}") as handle:
            parsed = diagnose.parse_pairs(handle.read())
        assert parsed and all(isinstance(v, int) for values in parsed.values() for v in values.values())
    assert "ListenOverflows" in diagnose.parse_pairs(open("/proc/net/netstat").read())["TcpExt"]
    with open("/proc/net/sockstat") as handle:
        assert "mem" in diagnose.parse_sockstat(handle.read())["TCP"]


def test_malformed_lines_do_not_raise():
    assert diagnose.parse_pairs("TcpExt: A B\nTcpExt: 1\n") == {}  # counts differ
    assert diagnose.parse_pairs(None) == {} and diagnose.parse_pairs("garbage\n\n:") == {}
    assert diagnose.parse_sockstat("TCP: inuse x mem 5") == {"TCP": {"mem": 5}}


def test_sockstat_file_nr_and_tcp_mem():
    assert diagnose.parse_sockstat(SOCKSTAT)["TCP"] == {"inuse": 3, "orphan": 0, "tw": 4, "alloc": 3, "mem": 120}
    assert diagnose.parse_ints("503 0 2466177", 3) == [503, 0, 2466177]
    assert diagnose.parse_ints("1 2", 3) is None and diagnose.parse_ints(None, 3) is None


def test_net_dir_follows_proc_root():
    assert diagnose.net_dir("/proc/sys") == "/proc/net"
    assert diagnose.net_dir("/tmp/fake/sys/") == "/tmp/fake/net"


# --------------------------------------------------------------------------
# Severity and deltas
# --------------------------------------------------------------------------
@pytest.mark.parametrize("used, limit, severity", [
    (100, 1024, "ok"), (819, 1024, "ok"), (820, 1024, "warning"), (973, 1024, "warning"),
    (974, 1024, "critical"), (1024, 1024, "critical"), (5, None, "ok"),
])
def test_headroom_rules(used, limit, severity):
    assert diagnose.severity_of_headroom(diagnose.headroom(used, limit)) == severity


def test_fd_headroom_finding_names_the_process_numbers_and_pillar_key():
    current = a_sample(fds={"42": {"name": "ss-server", "parent": None, "open": 900, "soft": 1024, "hard": 4096}})
    found = by_id(diagnose.findings(current, a_sample(), nofile=51200))["fds:ss-server:42"]
    assert found["severity"] == "warning" and found["pid"] == 42 and found["process"] == "ss-server"
    assert found["evidence"] == {"open": 900, "change": 800, "headroom_percent": 12.1}
    assert found["limit"] == {"RLIMIT_NOFILE": {"soft": 1024, "hard": 4096}}
    assert found["pillar"] == "shadowsocks:tuning:nofile" and "51200" in found["fix"]


def test_a_plugin_child_is_named_as_such():
    current = a_sample(fds={"43": {"name": "obfs-server", "parent": 42, "open": 10, "soft": 1024, "hard": 1024}})
    found = by_id(diagnose.findings(current, None))["fds:obfs-server:43"]
    assert "plugin of pid 42" in found["symptom"] and found["evidence"]["change"] is None


def test_counter_rules_without_and_with_a_baseline():
    current = a_sample(counters={"TcpExt:ListenOverflows": 12, "Udp:RcvbufErrors": 0})
    limits = {"net.core.somaxconn": "4096"}
    first = by_id(diagnose.findings(current, None, limits=limits))
    # No baseline: a count since boot is a warning, never critical.
    assert first["counter:TcpExt:ListenOverflows"]["severity"] == "warning"
    assert first["counter:TcpExt:ListenOverflows"]["evidence"] == {"value": 12, "change": None}
    assert first["counter:Udp:RcvbufErrors"]["severity"] == "ok"
    rose = by_id(diagnose.findings(current, a_sample(), limits=limits))["counter:TcpExt:ListenOverflows"]
    assert rose["severity"] == "critical" and rose["evidence"] == {"value": 12, "change": 5}
    assert rose["limit"] == {"net.core.somaxconn": "4096"}
    assert rose["pillar"] == "shadowsocks:tuning:sysctls:net.core.somaxconn"
    flat = by_id(diagnose.findings(a_sample(), a_sample(), limits=limits))["counter:TcpExt:ListenOverflows"]
    assert flat["severity"] == "ok" and flat["evidence"]["change"] == 0


def test_a_rising_udp_error_is_a_warning_with_its_buffer_key():
    rose = by_id(diagnose.findings(a_sample(counters={"Udp:RcvbufErrors": 3}), a_sample()))["counter:Udp:RcvbufErrors"]
    assert rose["severity"] == "warning" and rose["pillar"] == "shadowsocks:tuning:sysctls:net.core.rmem_default"


def test_system_tcp_memory_and_conntrack():
    found = by_id(diagnose.findings(
        a_sample(file_nr=[96000, 0, 100000], tcp_mem_pages=2500, conntrack=[90, 100]), a_sample()))
    assert found["file-nr"]["severity"] == "critical" and found["file-nr"]["limit"] == {"fs.file-max": 100000}
    assert found["file-nr"]["evidence"]["change"] == 95500
    assert found["tcp-mem"]["severity"] == "warning" and found["tcp-mem"]["limit"] == {"net.ipv4.tcp_mem": "1000 2000 3000"}
    assert found["conntrack"]["severity"] == "warning"
    assert found["conntrack"]["pillar"] == "shadowsocks:tuning:sysctls:net.netfilter.nf_conntrack_max"
    assert "conntrack" not in by_id(diagnose.findings(a_sample(), None))  # not loaded: no finding
    assert by_id(diagnose.findings(a_sample(tcp_mem_pages=3000), None))["tcp-mem"]["severity"] == "critical"


def test_drift_findings():
    found = by_id(diagnose.findings(a_sample(), None, drifted={"net.core.somaxconn": {"live": "128", "applied": "4096"}},
                                    managed=3))
    drift = found["drift:net.core.somaxconn"]
    assert drift["severity"] == "warning" and drift["evidence"] == {"value": "128", "applied": "4096"}
    assert "drift" not in found
    assert by_id(diagnose.findings(a_sample(), None, managed=3))["drift"]["severity"] == "ok"


def test_worst():
    assert diagnose.worst(["ok", "critical", "warning"]) == "critical" and diagnose.worst([]) == "ok"


@pytest.mark.parametrize("previous, current, why", [
    (None, a_sample(), "no baseline yet"),
    (a_sample(boot_id="old"), a_sample(), "another boot"),
    (a_sample(netns="net:[2]"), a_sample(), "another network namespace"),
    (a_sample(counters={"TcpExt:ListenOverflows": 99}), a_sample(), "counters were reset"),
    (a_sample(time=2000.0), a_sample(), "future"),
])
def test_a_sample_that_cannot_be_a_baseline(previous, current, why):
    assert why in diagnose.comparable(previous, current)


def test_a_comparable_sample():
    assert diagnose.comparable(a_sample(), a_sample(time=1010.0)) is None


# --------------------------------------------------------------------------
# The sample file
# --------------------------------------------------------------------------
def test_the_sample_round_trips_0600(tmp_path):
    state = tmp_path / "state"
    assert diagnose.save_sample(str(state), a_sample()) is None
    assert (state / "diagnose.json").stat().st_mode & 0o777 == 0o600
    assert diagnose.load_sample(str(state)) == (a_sample(), None)
    assert diagnose.load_sample(str(tmp_path / "none")) == (None, None)


@pytest.mark.parametrize("text, note", [
    ("{not json", "is not valid JSON"),
    (json.dumps({"version": 99}), "not a sample of this version"),
    (json.dumps(a_sample(time="yesterday")), "no time"),
    (json.dumps(a_sample(counters={"TcpExt:ListenOverflows": -1})), "bad counters"),
    (json.dumps(a_sample(fds={"x": {}})), "bad process entries"),
    (json.dumps(a_sample(file_nr="many")), "bad file_nr"),
    (json.dumps([1, 2]), "not a sample"),
])
def test_a_bad_sample_is_no_baseline_with_a_note(tmp_path, text, note):
    (tmp_path / "diagnose.json").write_text(text)
    previous, said = diagnose.load_sample(str(tmp_path))
    assert previous is None and note in said and "no baseline" in said


def test_a_linked_sample_is_neither_read_nor_replaced(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text(json.dumps(a_sample()))
    os.symlink(secret, tmp_path / "diagnose.json")
    previous, note = diagnose.load_sample(str(tmp_path))
    assert previous is None and "symbolic link" in note
    assert "symbolic link" in diagnose.save_sample(str(tmp_path), a_sample(time=5.0))
    assert os.path.islink(tmp_path / "diagnose.json") and json.loads(secret.read_text()) == a_sample()
    os.unlink(tmp_path / "diagnose.json")
    os.link(secret, tmp_path / "diagnose.json")
    assert "hard links" in diagnose.load_sample(str(tmp_path))[1]


def test_a_state_dir_that_cannot_be_written_is_a_note(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert "could not save the sample" in diagnose.save_sample(str(blocker / "state"), a_sample())


def test_the_report_on_this_box_has_no_baseline_then_one(tmp_path):
    state, config = str(tmp_path / "state"), str(tmp_path / "local.conf")
    first = diagnose.report("/proc/sys", state, config)
    assert first["baseline"] is None and any("no baseline yet" in n for n in first["notes"])
    assert {"file-nr", "counter:TcpExt:ListenOverflows"} <= {f["condition"] for f in first["findings"]}
    second = diagnose.report("/proc/sys", state, config)
    assert second["baseline"] is not None and not any("no baseline" in n for n in second["notes"])
    kept = diagnose.report("/proc/sys", state, config, previous=None, save=False)
    assert kept["sample"]["version"] == 1 and "no baseline yet" in " ".join(kept["notes"])
    nxt = diagnose.report("/proc/sys", state, config, previous=kept["sample"], save=False)
    assert nxt["baseline"]["time"] == kept["sample"]["time"]


# --------------------------------------------------------------------------
# The beacon: config and only-on-change
# --------------------------------------------------------------------------
@pytest.mark.parametrize("config, ok, said", [
    ([{"interval": 10}, {"headroom": 20}], True, "Valid"),
    ([], True, "Valid"),
    ([{"headroom": 12.5}, {"counters": False}, {"drift": True}, {"disable_during_state_run": True}], True, "Valid"),
    ({"headroom": 20}, False, "must be a list"),
    (["headroom"], False, "must be a list of mappings"),
    ([{"headroom": 0}], False, "headroom: 0 must be a percentage"),
    ([{"headroom": "20%"}], False, "headroom: '20%'"),
    ([{"headroom": True}], False, "headroom: True"),
    ([{"drift": "yes"}], False, "drift: 'yes' must be true or false"),
    ([{"headroon": 20}], False, "unknown setting(s) headroon"),
])
def test_beacon_validate(config, ok, said):
    valid, message = load_beacon().validate(config)
    assert valid is ok and said in message


def test_beacon_fires_once_per_condition_and_again_when_it_gets_worse_or_returns():
    beacon = load_beacon()
    warn = {"condition": "fds:ss-server:42", "severity": "warning", "evidence": {"open": 900}}
    rising = {"condition": "counter:TcpExt:ListenOverflows", "severity": "critical", "evidence": {"value": 9, "change": 2}}
    flat = dict(rising, severity="ok", evidence={"value": 9, "change": 0})
    drift = {"condition": "drift:net.core.somaxconn", "severity": "warning", "evidence": {"value": "128"}}
    events, memory = beacon.changes([warn, rising, drift], {}, {})
    assert [(e["tag"], e["condition"]) for e in events] == [
        ("fd-headroom", "fds:ss-server:42"), ("counter", "counter:TcpExt:ListenOverflows"),
        ("drift", "drift:net.core.somaxconn")]
    # the same conditions again: nothing; a counter still rising is the same run of rises
    assert beacon.changes([warn, rising, drift], memory, {})[0] == []
    # worse, or a new drifted value: one event each
    worse = dict(warn, severity="critical")
    events, memory = beacon.changes([worse, rising, dict(drift, evidence={"value": "64"})], memory, {})
    assert [e["condition"] for e in events] == ["fds:ss-server:42", "drift:net.core.somaxconn"]
    # cleared, then back: fires again
    events, memory = beacon.changes([flat], memory, {})
    assert events == [] and memory == {}
    assert [e["condition"] for e in beacon.changes([rising], memory, {})[0]] == ["counter:TcpExt:ListenOverflows"]
    # switched off in the config
    assert beacon.changes([rising, drift], {}, {"counters": False, "drift": False})[0] == []
    # ok findings and counters without a baseline never fire
    no_base = dict(rising, severity="warning", evidence={"value": 9, "change": None})
    assert beacon.changes([dict(warn, severity="ok"), no_base], {}, {})[0] == []
