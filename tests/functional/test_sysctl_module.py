"""The execution module through the real Salt loader (salt-call) against the
real kernel, inside a fresh network namespace per test. How the package gets
onto a minion (pip, file_roots, re-sync) is tests/functional/test_install_modes.py."""

import subprocess
import sys

from support.common import REPO, read_in_netns


def ok(result):
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    return result.data


def failed(result):
    assert result.returncode != 0, result.stdout
    return result.stdout + result.stderr


def test_get_normalises_whitespace_and_reads_the_namespace(masterless):
    live = read_in_netns(masterless.netns, "net.ipv4.tcp_rmem")
    assert ok(masterless.run("shadowsocks_tuning.get", "net.ipv4.tcp_rmem")) == " ".join(live)
    both = ok(masterless.run("shadowsocks_tuning.get", "[net.core.somaxconn, net.ipv4.tcp_rmem, net.ipv4.tcp_tw_recycle]"))
    assert both == {
        "net.core.somaxconn": " ".join(read_in_netns(masterless.netns, "net.core.somaxconn")),
        "net.ipv4.tcp_rmem": " ".join(live),
        "net.ipv4.tcp_tw_recycle": None,
    }


def test_set_writes_per_namespace_keys_and_reads_back(masterless):
    before = read_in_netns(masterless.netns, "net.ipv4.tcp_fin_timeout")[0]
    assert ok(masterless.run("shadowsocks_tuning.set", "net.ipv4.tcp_fin_timeout", "17")) == {"old": before, "new": "17"}
    assert read_in_netns(masterless.netns, "net.ipv4.tcp_fin_timeout") == ["17"]
    ok(masterless.run("shadowsocks_tuning.set", "net.ipv4.tcp_rmem", "4096 262144 67108864"))
    assert read_in_netns(masterless.netns, "net.ipv4.tcp_rmem") == ["4096", "262144", "67108864"]
    ok(masterless.run("shadowsocks_tuning.set", "net.ipv4.ip_local_port_range", "[10000, 65000]"))
    assert read_in_netns(masterless.netns, "net.ipv4.ip_local_port_range") == ["10000", "65000"]


def test_set_failure_names_key_value_and_kernel_error(masterless):
    # A global key: present but read-only inside a child network namespace.
    out = failed(masterless.run("shadowsocks_tuning.set", "net.core.rmem_max", "67108864"))
    assert "net.core.rmem_max" in out and "67108864" in out and "read-only" in out


def test_capacity_keys_are_not_lowered_unless_forced(masterless):
    ok(masterless.run("shadowsocks_tuning.set", "net.core.somaxconn", "8192"))
    out = failed(masterless.run("shadowsocks_tuning.set", "net.core.somaxconn", "1024"))
    assert "refusing to lower 8192 to 1024" in out and "force=True" in out
    assert read_in_netns(masterless.netns, "net.core.somaxconn") == ["8192"]
    ok(masterless.run("shadowsocks_tuning.set", "net.core.somaxconn", "1024", "force=True"))
    assert read_in_netns(masterless.netns, "net.core.somaxconn") == ["1024"]


def test_probe_classifies_keys_as_this_kernel_and_namespace_show_them(masterless):
    report = ok(masterless.run("shadowsocks_tuning.probe"))
    status = {key: entry["status"] for key, entry in report.items()}
    # per-namespace keys: writable here
    assert status["net.core.somaxconn"] == status["net.ipv4.tcp_fastopen"] == "writable"
    # global keys: present-but-read-only or invisible inside the namespace
    for key in ("net.core.rmem_max", "net.core.wmem_default", "net.core.netdev_max_backlog", "net.core.default_qdisc"):
        assert status[key] == "read-only", key
        assert "set it on the host" in report[key]["reason"]
    # removed from the kernel in 4.12
    assert status["net.ipv4.tcp_tw_recycle"] == "absent"
    assert "Linux 4.12" in report["net.ipv4.tcp_tw_recycle"]["reason"]


def test_probe_checks_congestion_controls_for_real(masterless):
    report = ok(masterless.run("shadowsocks_tuning.probe", "{net.ipv4.tcp_congestion_control: hybla}"))
    entry = report["net.ipv4.tcp_congestion_control"]
    assert entry["status"] == "restricted" and "'hybla' is not available" in entry["reason"]
    # cubic is available on this kernel but not in tcp_allowed_congestion_control,
    # so a child namespace may not select it (EPERM).
    report = ok(masterless.run("shadowsocks_tuning.probe", "{net.ipv4.tcp_congestion_control: cubic}"))
    entry = report["net.ipv4.tcp_congestion_control"]
    assert entry["status"] == "restricted" and "not allowed inside this network namespace" in entry["reason"]
    report = ok(masterless.run("shadowsocks_tuning.probe", "[net.core.rmem_max, net.ipv4.tcp_fastopen]"))
    assert sorted(report) == ["net.core.rmem_max", "net.ipv4.tcp_fastopen"]


def test_hybla_set_tries_the_module_and_says_what_happened(masterless):
    out = failed(masterless.run("shadowsocks_tuning.set", "net.ipv4.tcp_congestion_control", "hybla"))
    assert "'hybla' is not available (available: reno bbr cubic)" in out
    assert "modprobe tcp_hybla failed" in out
    assert "No such file or directory" not in out  # the kernel's misleading errno is never surfaced
    assert read_in_netns(masterless.netns, "net.ipv4.tcp_congestion_control") != ["hybla"]
    assert ok(masterless.run("shadowsocks_tuning.set", "net.ipv4.tcp_congestion_control", "reno"))["new"] == "reno"


def test_tw_recycle_zero_is_satisfied_and_one_is_refused(masterless):
    result = ok(masterless.run("shadowsocks_tuning.set", "net.ipv4.tcp_tw_recycle", "0"))
    assert result["old"] is None and "removed from the kernel in Linux 4.12" in result["comment"]
    out = failed(masterless.run("shadowsocks_tuning.set", "net.ipv4.tcp_tw_recycle", "1"))
    assert "behind NAT" in out


def test_path_traversal_keys_never_reach_the_filesystem(masterless):
    for key in ("net/../../etc/shadow", "..", "net.core.somaxconn/../../../etc/passwd"):
        out = failed(masterless.run("shadowsocks_tuning.get", key))
        assert "malformed" in out or "unknown top-level" in out, out
        assert "root:" not in out


def test_proc_root_option_shows_a_kernel_that_still_has_tw_recycle(make_masterless, tmp_path):
    # This kernel has no tcp_tw_recycle; a pre-4.12 kernel is shown with a copied tree.
    fake = tmp_path / "oldkernel"
    (fake / "net" / "ipv4").mkdir(parents=True)
    (fake / "net" / "ipv4" / "tcp_tw_recycle").write_text("1\n")
    minion = make_masterless(**{"shadowsocks_tuning.proc_root": str(fake)})
    assert ok(minion.run("shadowsocks_tuning.probe", "[net.ipv4.tcp_tw_recycle]"))["net.ipv4.tcp_tw_recycle"]["status"] == "writable"
    assert ok(minion.run("shadowsocks_tuning.set", "net.ipv4.tcp_tw_recycle", "0")) == {"old": "1", "new": "0"}
    assert (fake / "net" / "ipv4" / "tcp_tw_recycle").read_text() == "0"


def test_module_refuses_to_load_off_linux_with_a_reason(tmp_path):
    # The engines are importable (as in extmods/utils): only the platform is wrong.
    code = (
        "import sys; sys.path[:0] = [%r, %r]; sys.platform = 'freebsd13'\n"
        "import shadowsocks_tuning as m; print('sstuning_catalogue' in sys.modules, m.__virtual__())"
        % (str(REPO / "_modules"), str(REPO / "_utils"))
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    assert out.startswith("True (False, 'shadowsocks_tuning: needs a Linux kernel"), out
