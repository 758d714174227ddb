"""The catalogue: key names, values in the kernel's text form, and the one
keep-the-higher-value rule shared by capacity sysctls and open-file limits."""

import pytest
from salt.exceptions import SaltInvocationError

import sstuning_catalogue as catalogue


@pytest.mark.parametrize(
    "key",
    ["net.core.somaxconn", "net.ipv4.conf.eth0.rp_filter", "net.ipv6.conf.br-lan.forwarding", "fs.file-max",
     "net.ipv4.neigh.veth@if3.gc_stale_time"],
)
def test_valid_keys_pass(key):
    assert catalogue.validate_key(key) == key


@pytest.mark.parametrize(
    "key",
    ["net/../../etc/shadow", "..", "net..core", "/etc/passwd", "net.core/somaxconn", "net.core.some maxconn",
     "net.core.x\nfs.file-max", "net.core.\0x", "", "somaxconn", "etc.shadow", "net.ipv4.tcp_rmem=1", None, 7],
)
def test_malformed_keys_are_refused_before_any_file_access(key):
    with pytest.raises(SaltInvocationError) as err:
        catalogue.validate_key(key)
    assert str(err.value).startswith("sysctl key")


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("net.ipv4.tcp_rmem", "4096\t87380\t67108864", "4096 87380 67108864"),
        ("net.ipv4.tcp_rmem", [4096, 87380, 67108864], "4096 87380 67108864"),
        ("net.ipv4.tcp_rmem", " 4096  87380 67108864 ", "4096 87380 67108864"),
        ("net.ipv4.ip_local_port_range", "10000 65000", "10000 65000"),
        ("net.ipv4.ip_local_port_range", [10000, 65000], "10000 65000"),
        ("net.core.somaxconn", 4096, "4096"),
        ("net.core.somaxconn", "4096", "4096"),
        ("net.core.somaxconn", "+4096", "4096"),
        ("net.ipv4.tcp_congestion_control", "bbr", "bbr"),
        ("net.ipv4.tcp_tw_recycle", 0, "0"),
        ("vm.swappiness", 10, "10"),  # outside the catalogue: plain printable text
    ],
)
def test_values_are_normalised_to_the_kernel_form(key, value, expected):
    assert catalogue.normalise(key, value) == expected


@pytest.mark.parametrize(
    "key, value, rule",
    [
        ("net.ipv4.tcp_rmem", "4096 87380", "three integers"),
        ("net.ipv4.tcp_rmem", "67108864 87380 4096", "min <= default <= max"),
        ("net.ipv4.ip_local_port_range", "65000 10000", "low <= high"),
        ("net.ipv4.ip_local_port_range", "0 70000", "out of range"),
        ("net.core.somaxconn", -1, "not an integer"),
        ("net.core.somaxconn", 2**40, "out of range"),
        ("net.core.somaxconn", "4096\nfs.file-max = 1", "newline"),
        ("net.core.somaxconn", "4096\n", "newline"),
        ("net.core.somaxconn", True, "boolean"),
        ("net.core.somaxconn", "lots", "not an integer"),
        ("net.ipv4.tcp_syncookies", 3, "out of range"),
        ("net.ipv4.tcp_congestion_control", "bbr\nfs.file-max=1", "newline"),
        ("net.ipv4.tcp_congestion_control", 5, "not a name"),
        ("net.ipv4.tcp_tw_recycle", 1, "behind NAT"),
        ("vm.swappiness", "10\nkernel.panic = 1", "plain printable"),
        ("vm.swappiness", "a=b", "plain printable"),
    ],
)
def test_bad_values_name_the_key_and_the_rule(key, value, rule):
    with pytest.raises(SaltInvocationError) as err:
        catalogue.normalise(key, value)
    assert key in str(err.value) and rule in str(err.value)


def test_where_prefixes_every_refusal():
    with pytest.raises(SaltInvocationError) as err:
        catalogue.normalise("net.core.somaxconn", "lots", "pillar shadowsocks:tuning:sysctls: ")
    assert str(err.value).startswith("pillar shadowsocks:tuning:sysctls: net.core.somaxconn: ")
    with pytest.raises(SaltInvocationError) as err:
        catalogue.normalise("net/../x", 1, "pillar shadowsocks:tuning:sysctls: ")
    assert str(err.value).startswith("pillar shadowsocks:tuning:sysctls: sysctl key 'net/../x'")


def test_a_removed_key_wanted_at_zero_is_already_satisfied():
    assert catalogue.absent_is_satisfied("net.ipv4.tcp_tw_recycle", "0")
    assert not catalogue.absent_is_satisfied("net.ipv4.tcp_tw_recycle", "1")
    assert not catalogue.absent_is_satisfied("net.core.somaxconn", "0")  # never removed: absent is a problem


def test_describe_shows_removal_versions_as_text():
    described = catalogue.describe()
    assert set(described) == set(catalogue.CATALOGUE)
    assert described["net.ipv4.tcp_tw_recycle"]["removed"] == "4.12"
    assert catalogue.CATALOGUE["net.ipv4.tcp_tw_recycle"]["removed"] == (4, 12)  # the data itself is untouched


# --------------------------------------------------------------------------
# keep_higher: one rule for capacity sysctls and open-file limits in files
# --------------------------------------------------------------------------
def test_a_capacity_sysctl_is_only_raised():
    assert catalogue.keep_higher("fs.file-max", "51200", "2466177") == ("2466177", ("2466177",))
    assert catalogue.kept_note("51200", "2466177", "2466177", ("2466177",)) == (
        "kept 2466177 (the profile's 51200 would be less)")
    assert catalogue.keep_higher("fs.file-max", "51200", "8192") == ("51200", ())
    assert catalogue.keep_higher("net.core.somaxconn", "4096", "4096") == ("4096", ())


def test_a_key_that_is_not_a_capacity_is_lowered_as_asked():
    assert not catalogue.CATALOGUE["net.ipv4.tcp_fin_timeout"].get("more")
    assert catalogue.keep_higher("net.ipv4.tcp_fin_timeout", "30", "60") == ("30", ())
    assert catalogue.keep_higher("vm.swappiness", "10", "60") == ("10", ())  # outside the catalogue


def test_every_field_of_a_buffer_triple_is_kept_at_the_higher_value():
    assert catalogue.keep_higher("net.ipv4.tcp_rmem", "4096 87380 4194304", "4096 131072 33554432") == (
        "4096 131072 33554432", ("default 131072", "max 33554432"))
    # Each field on its own: the higher max of the profile, the higher min and default of the kernel.
    target, kept = catalogue.keep_higher("net.ipv4.tcp_rmem", "4096 87380 67108864", "8192 131072 33554432")
    assert (target, kept) == ("8192 131072 67108864", ("min 8192", "default 131072"))
    assert catalogue.kept_note("4096 87380 67108864", "8192 131072 33554432", target, kept) == (
        "kept min 8192, default 131072 of 8192 131072 33554432 (the profile's 4096 87380 67108864 would be less)")


def test_no_key_means_plain_numbers_higher_is_more():
    assert catalogue.keep_higher(None, "16384", "32768") == ("32768", ("32768",))
    assert catalogue.keep_higher(None, "65536", "32768") == ("65536", ())
    assert catalogue.keep_higher(None, "16384", None) == ("16384", ())  # nothing in the file yet
    # soft and hard of an open-file limit, each on its own
    assert catalogue.keep_higher(None, "16384 16384", "1024 19000", directions=(catalogue.UP, catalogue.UP)) == (
        "16384 19000", ("high 19000",))


@pytest.mark.parametrize("key, live", [(None, "${MAXFD}"), (None, "unlimited"), ("fs.file-max", "lots"),
                                       ("net.ipv4.tcp_rmem", "4096 87380 x")])
def test_a_live_value_that_is_not_a_number_gives_the_wanted_one(key, live):
    wanted = "4096 87380 4194304" if key == "net.ipv4.tcp_rmem" else "16384"
    assert catalogue.keep_higher(key, wanted, live) == (wanted, ())


def test_effects_are_the_measured_lines_of_the_effect_benchmark():
    """`explain` says what each profile buys: EFFECTS must be exactly what
    bench/effect measured (bench/results/effect.json), for every built-in
    profile it ran; bench/effects_to_catalogue copies them."""
    import json
    import pathlib

    data = json.loads((pathlib.Path(__file__).parents[2] / "bench/results/effect.json").read_text())
    measured = {name: line.split(": ", 1)[1] for name, line in data["what_it_buys"].items()
                if name in catalogue.PROFILES}
    assert measured and catalogue.EFFECTS == measured
    machine = data["machine"]
    assert catalogue.EFFECTS_MEASURED == f"bench/effect, {machine['date']}, commit {machine['commit']}"
