"""The container engine on plain values: which keys a container may set,
which stay the host's, and the snippets (compose, docker run, Kubernetes)
parsed back the way their tools read them."""

import shlex

import pytest
import yaml
from salt.exceptions import SaltInvocationError

import sstuning_container as container
from sstuning_catalogue import CATALOGUE
from sstuning_settings import resolve

# A fresh network namespace on the project's machine (Linux 6.18, 24 GiB),
# and the host's global keys as a child namespace still reads some of them.
LIVE = {
    "fs.file-max": "2466177",
    "net.core.rmem_max": "4194304", "net.core.wmem_max": "4194304",
    "net.core.rmem_default": "212992", "net.core.wmem_default": "212992",
    "net.core.netdev_max_backlog": "1000", "net.core.somaxconn": "4096",
    "net.ipv4.tcp_syncookies": "1", "net.ipv4.tcp_tw_reuse": "2", "net.ipv4.tcp_tw_recycle": None,
    "net.ipv4.tcp_fin_timeout": "60", "net.ipv4.tcp_keepalive_time": "7200",
    "net.ipv4.ip_local_port_range": "32768 60999", "net.ipv4.ip_local_reserved_ports": "",
    "net.ipv4.tcp_max_syn_backlog": "2048", "net.ipv4.tcp_max_tw_buckets": "131072", "net.ipv4.tcp_fastopen": "1",
    "net.ipv4.tcp_rmem": "4096 131072 33554432", "net.ipv4.tcp_wmem": "4096 16384 4194304",
    "net.ipv4.tcp_mtu_probing": "0", "net.ipv4.tcp_congestion_control": "bbr",
    "net.ipv4.tcp_notsent_lowat": "4294967295",
    "net.core.default_qdisc": "fq_codel",
}
AVAILABLE, ALLOWED = ["reno", "bbr", "cubic"], ["reno", "bbr"]
# Kubernetes' safe set, as read in pkg/kubelet/sysctl/safe_sysctls.go.
K8S_SAFE = {
    "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range",
    "net.ipv4.ip_unprivileged_port_start", "net.ipv4.ip_local_reserved_ports", "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_keepalive_intvl", "net.ipv4.tcp_keepalive_probes", "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem",
}


def run(fmt="compose", tuning=None, arguments=None, **kwargs):
    settings = resolve(tuning or {}, arguments)
    return container.container(settings, fmt, LIVE, kwargs.pop("available", AVAILABLE),
                               kwargs.pop("allowed", ALLOWED), **kwargs)


def test_per_namespace_keys_go_to_the_container_global_ones_to_the_host():
    out = run()
    assert out["profile"] == "low-latency" and out["nofile"] == 51200
    for key in out["sysctls"]:
        assert CATALOGUE[key]["scope"] == "netns", key
    for key in out["host_only"]:
        assert CATALOGUE[key]["scope"] == "global", key
    # raised on the host: more than this kernel has
    assert out["host_only"] == {"net.core.rmem_max": "67108864", "net.core.wmem_max": "67108864",
                                "net.core.netdev_max_backlog": "4096"}
    assert out["sysctls"]["net.ipv4.tcp_tw_reuse"] == "1"
    assert out["sysctls"]["net.ipv4.ip_local_port_range"] == "10000 65001"
    # never below what the kernel has: the default field of tcp_rmem stays 131072
    assert out["sysctls"]["net.ipv4.tcp_rmem"] == "4096 131072 67108864"
    assert any(note.startswith("net.ipv4.tcp_rmem: kept default 131072") for note in out["notes"])


def test_keys_that_need_no_line_are_left_out_with_the_reason():
    left = run()["left_out"]
    assert set(left) == {"fs.file-max", "net.core.rmem_default", "net.core.wmem_default",
                         "net.ipv4.tcp_max_tw_buckets", "net.ipv4.tcp_tw_recycle", "net.ipv4.tcp_congestion_control",
                         "net.ipv4.ip_local_reserved_ports"}
    assert left["net.ipv4.tcp_max_tw_buckets"].startswith("kept 131072 (the profile's 5000 would be less)")
    assert "removed" in left["net.ipv4.tcp_tw_recycle"]
    assert "kernel default cubic" in left["net.ipv4.tcp_congestion_control"]
    assert "no shadowsocks port" in left["net.ipv4.ip_local_reserved_ports"]


def test_compose_parses_into_sysctls_and_ulimits_of_the_service():
    out = run("compose", {"nofile": 16384}, service="ss-libev")
    assert yaml.safe_load(out["text"]) == {"services": {"ss-libev": {
        "sysctls": out["sysctls"],
        # never below the runtime's own default hard limit
        "ulimits": {"nofile": {"soft": 16384, "hard": container.RUNTIME_NOFILE[1]}},
    }}}
    assert "#   net.core.rmem_max = 67108864" in out["text"]


def test_a_daemon_that_raises_its_own_soft_limit_needs_only_the_hard_one():
    kinds = resolve({})["limits"]["kinds"]
    # shadowsocks-rust and the Go servers raise soft to hard at start: the
    # runtime's default hard limit already gives them more than 16384.
    out = run("compose", {"nofile": 16384}, kind=kinds["shadowsocks_rust"])
    assert "ulimits" not in yaml.safe_load(out["text"])["services"]["shadowsocks"]
    assert out["ulimits"] is None
    assert any("raises its soft limit to its hard limit by itself" in note for note in out["notes"])
    # above that default, only the hard limit is raised (soft follows it at start)
    out = run("docker", {"nofile": 600000}, kind=kinds["xray"])
    assert "--ulimit nofile=600000:600000" in out["text"]
    # a daemon that does not raise its own soft limit gets both, never below the runtime's
    out = run("docker", {"nofile": 600000}, kind=kinds["shadowsocks_libev"])
    assert "--ulimit nofile=600000:600000" in out["text"]
    assert container.ulimits(16384, False) == (16384, container.RUNTIME_NOFILE[1])


def test_docker_run_carries_every_pair_and_the_ulimit():
    out = run("docker", {"nofile": 20000}, arguments={"profile": "bbr"})
    code = "\n".join(line for line in out["text"].splitlines() if not line.startswith("#"))
    argv = shlex.split(code.replace("\\\n", " "))
    assert argv[:2] == ["docker", "run"] and argv[-2:] == ["IMAGE", "[COMMAND]"]
    pairs = [argv[i + 1] for i, arg in enumerate(argv) if arg == "--sysctl"]
    assert dict(pair.split("=", 1) for pair in pairs) == out["sysctls"]
    assert argv[argv.index("--ulimit") + 1] == f"nofile=20000:{container.RUNTIME_NOFILE[1]}"
    # bbr is allowed in a child namespace here, and the profile asks for it
    assert out["sysctls"]["net.ipv4.tcp_congestion_control"] == "bbr"
    assert out["sysctls"]["net.ipv4.tcp_notsent_lowat"] == "16384"
    assert out["host_only"]["net.core.default_qdisc"] == "fq"


def test_kubernetes_marks_the_unsafe_keys_and_names_the_kubelet_flag():
    out = run("kubernetes", arguments={"profile": "bbr"})
    parsed = yaml.safe_load(out["text"])
    assert parsed == {"securityContext": {"sysctls": [{"name": k, "value": v} for k, v in out["sysctls"].items()]}}
    assert out["unsafe_in_kubernetes"] == sorted(set(out["sysctls"]) - K8S_SAFE)
    assert "net.core.somaxconn" in out["unsafe_in_kubernetes"]
    assert "net.ipv4.tcp_rmem" not in out["unsafe_in_kubernetes"]
    lines = out["text"].splitlines()
    for key in out["sysctls"]:
        line = next(line for line in lines if line.startswith(f"  - name: {key}"))
        assert line.endswith("# unsafe: kubelet --allowed-unsafe-sysctls") == (key not in K8S_SAFE), line
    assert f"#   kubelet --allowed-unsafe-sysctls={','.join(out['unsafe_in_kubernetes'])}" in lines
    assert any("a pod spec cannot set it" in note for note in out["notes"])


def test_the_safe_set_is_the_kubelets():
    assert set(container.KUBERNETES_SAFE) == K8S_SAFE


def test_a_congestion_control_a_container_cannot_set_is_left_out():
    # hybla is not available here: a runtime would fail the container's start
    out = run(arguments={"profile": "high-latency"})
    assert "net.ipv4.tcp_congestion_control" not in out["sysctls"]
    assert "'hybla' is not available" in out["left_out"]["net.ipv4.tcp_congestion_control"]
    # ... unless the pillar's fallback can be set in a child namespace
    out = run(tuning={"congestion_fallback": "bbr"}, arguments={"profile": "high-latency"})
    assert out["sysctls"]["net.ipv4.tcp_congestion_control"] == "bbr"
    assert any("using fallback 'bbr'" in note for note in out["notes"])
    # cubic is loaded but not in tcp_allowed_congestion_control
    out = run(tuning={"sysctls": {"net.ipv4.tcp_congestion_control": "cubic"}})
    assert "'cubic' is available but not allowed inside this network namespace (allowed: reno bbr)" in (
        out["left_out"]["net.ipv4.tcp_congestion_control"])


def test_reserved_ports_come_from_pillar_and_the_shadowsocks_configs():
    out = run(tuning={"reserved_ports": [8388, "9000-9002"]},
              config_ports={1080: "/etc/shadowsocks-libev/config.json (local_port)"})
    assert out["sysctls"]["net.ipv4.ip_local_reserved_ports"] == "1080,8388,9000-9002"
    assert any("1080 (/etc/shadowsocks-libev/config.json (local_port))" in note for note in out["notes"])


def test_a_profile_that_lowers_on_purpose_lowers_in_the_container_too():
    small = {"profiles": {"small": {"include": "low-latency", "sysctls": {"net.ipv4.tcp_rmem": "4096 87380 4194304"},
                                    "lower": {"net.ipv4.tcp_rmem": "a small box"}}}}
    out = run(tuning=small, arguments={"profile": "small"})
    assert out["sysctls"]["net.ipv4.tcp_rmem"] == "4096 131072 4194304"  # the max lowered, the default kept
    memory = run(arguments={"profile": "low-memory"})
    assert memory["sysctls"]["net.ipv4.tcp_notsent_lowat"] == "16384"
    assert memory["sysctls"]["net.ipv4.tcp_wmem"] == "4096 16384 8388608"
    assert memory["host_only"]["net.core.rmem_max"] == "4194304"


def test_keys_outside_the_catalogue_are_placed_by_their_name():
    out = run(tuning={"sysctls": {"net.ipv4.conf.all.rp_filter": 2, "vm.swappiness": 10}})
    assert out["sysctls"]["net.ipv4.conf.all.rp_filter"] == "2"
    assert out["host_only"]["vm.swappiness"] == "10"
    assert any("vm.swappiness: not in this package's catalogue" in note for note in out["notes"])


@pytest.mark.parametrize("argument, value", [("format", "xml"), ("service", "Bad Name"), ("service", "")])
def test_bad_arguments_name_themselves(argument, value):
    kwargs = {"service": value} if argument == "service" else {}
    with pytest.raises(SaltInvocationError, match=f"^{argument}: "):
        run(value if argument == "format" else "compose", **kwargs)


def test_global_keys_a_child_namespace_cannot_see_go_to_the_host_with_their_value():
    """Run from inside a network namespace (a container), the global keys
    are not there to read: they are the host's to set, with the profile's
    value (apply on the host judges them against the host's), never `None`."""
    live = {key: value for key, value in LIVE.items() if key not in ("net.core.netdev_max_backlog",
                                                                       "net.core.default_qdisc")}
    out = container.container(resolve({}, {"profile": "bbr"}), "compose", live, AVAILABLE, ALLOWED)
    assert out["host_only"]["net.core.netdev_max_backlog"] == "4096"
    assert out["host_only"]["net.core.default_qdisc"] == "fq"
    assert None not in out["host_only"].values() and None not in out["sysctls"].values()
    assert "#   net.core.default_qdisc = fq" in out["text"]


def test_an_unset_nofile_is_the_recipe_s_even_where_this_box_grants_less():
    """A container definition is for the box that runs it: this box's
    ceiling (the notes' `the most this box can grant`) does not cap it."""
    box = {"grantable": {"sysvinit": 20000, "systemd": 20000}, "nr_open": 1048576, "systemd": False}
    settings = resolve({}, None, box)
    assert settings["nofile"] == 20000 and settings["nofile_asked"] == 51200
    out = container.container(settings, "compose", LIVE, AVAILABLE, ALLOWED)
    assert out["nofile"] == 51200 and out["ulimits"] == {"soft": 51200, "hard": 524288}
    # Asked for in pillar: that value.
    assert container.container(resolve({"nofile": 16384}, None, box), "compose", LIVE, AVAILABLE,
                               ALLOWED)["ulimits"] == {"soft": 16384, "hard": 524288}
