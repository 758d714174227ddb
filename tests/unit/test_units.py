"""systemd units as systemd reads them, on real files in a temporary tree of
unit directories (/etc, /run, /usr/lib in systemd's order): which unit file
and drop-ins apply and in which order, the LimitNOFILE they give, the
DefaultLimitNOFILE of system.conf, and the drop-in this package writes. The
order itself is checked against a real systemd in
tests/integration/test_systemd_harness.py."""

import os

import pytest

import sstuning_units as units

NR_OPEN = 1048576
DEFAULT = (1024, 524288)


@pytest.fixture
def dirs(tmp_path):
    """The unit directories, in the order systemd searches them."""
    paths = [tmp_path / name for name in ("etc", "run", "usr-lib")]
    for path in paths:
        path.mkdir()
    return paths


def put(directory, unit, name, text):
    path = directory / f"{unit}.d" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return str(path)


def limit(value):
    return f"[Service]\nLimitNOFILE={value}\n"


def effective(dirs, unit, skip=None):
    return units.effective([str(d) for d in dirs], unit, NR_OPEN, DEFAULT, skip)


# --------------------------------------------------------------------------
# Which files, in which order
# --------------------------------------------------------------------------
def test_the_unit_file_is_the_first_found_and_an_instance_uses_its_template(dirs):
    etc, run, lib = dirs
    (lib / "ss.service").write_text("[Service]\n")
    assert units.unit_file([str(d) for d in dirs], "ss.service") == str(lib / "ss.service")
    (etc / "ss.service").write_text("[Service]\n")  # a copy in /etc hides the package's
    assert units.unit_file([str(d) for d in dirs], "ss.service") == str(etc / "ss.service")
    (lib / "ss-server@.service").write_text("[Service]\n")
    assert units.unit_file([str(d) for d in dirs], "ss-server@a.service") == str(lib / "ss-server@.service")
    assert units.unit_file([str(d) for d in dirs], "absent.service") is None
    assert units.template_of("ss-server@a.service") == "ss-server@.service"
    assert units.template_of("ss-server@.service") is None and units.template_of("ss.service") is None


def test_dropins_merge_by_name_across_directories_in_name_order(dirs):
    etc, run, lib = dirs
    lib_a = put(lib, "ss.service", "a.conf", limit(1))
    put(lib, "ss.service", "c.conf", limit(3))
    run_c = put(run, "ss.service", "c.conf", limit(30))  # /run hides /usr/lib's c.conf
    etc_c = put(etc, "ss.service", "c.conf", limit(300))  # and /etc hides both
    run_b = put(run, "ss.service", "b.conf", limit(2))
    put(etc, "ss.service", "notes.txt", "not a drop-in")
    order = units.dropins([str(d) for d in dirs], "ss.service")
    assert order == [lib_a, run_b, etc_c]
    assert run_c not in order
    assert effective(dirs, "ss.service")["limit"] == (300, 300)


def test_a_dropin_linked_to_dev_null_masks_the_same_name_below_it(dirs):
    """systemd's way to switch off a package's drop-in: a link to /dev/null of
    the same name in /etc. It hides the other and sets nothing."""
    etc, run, lib = dirs
    (lib / "ss.service").write_text(limit(8192))
    put(lib, "ss.service", "limits.conf", limit(2048))
    assert effective(dirs, "ss.service")["limit"] == (2048, 2048)
    (etc / "ss.service.d").mkdir()
    os.symlink("/dev/null", etc / "ss.service.d" / "limits.conf")
    assert effective(dirs, "ss.service")["limit"] == (8192, 8192)


def test_an_instance_dropin_hides_its_template_s_of_the_same_name(dirs):
    etc, run, lib = dirs
    (lib / "ss-server@.service").write_text(limit(1000))
    put(etc, "ss-server@.service", "limits.conf", limit(2000))
    put(etc, "ss-server@.service", "other.conf", "[Service]\nNice=1\n")
    mine = put(etc, "ss-server@a.service", "limits.conf", limit(3000))
    # The instance sees its own limits.conf; another instance, the template's.
    assert effective(dirs, "ss-server@a.service")["limit"] == (3000, 3000)
    assert effective(dirs, "ss-server@b.service")["limit"] == (2000, 2000)
    assert mine in units.dropins([str(d) for d in dirs], "ss-server@a.service")
    assert any(p.endswith("ss-server@.service.d/other.conf")
               for p in units.dropins([str(d) for d in dirs], "ss-server@a.service"))


def test_override_conf_is_read_before_this_package_s_dropin_and_zz_after_it(dirs):
    etc, run, lib = dirs
    unit = lib / "ss.service"
    unit.write_text(limit(32768))
    ours = units.dropin_path(str(etc), "ss.service")
    override = put(etc, "ss.service", "override.conf", limit(4096))  # systemctl edit
    shipped = put(lib, "ss.service", units.DROPIN_NAME, limit(1))  # ours once written in /etc hides it: left out
    late = put(etc, "ss.service", "zz-limits.conf", limit("1024:2048"))
    later = put(run, "ss.service", "zzz.conf", limit(""))  # an empty value: back to DefaultLimitNOFILE
    got = effective(dirs, "ss.service", skip=ours)
    assert (got["before"], got["before_source"]) == ((4096, 4096), override)  # what ours must not go below
    assert got["after"] == [(late, (1024, 2048)), (later, DEFAULT)]
    assert (got["limit"], got["source"]) == (DEFAULT, later)  # the last one wins in the end
    # Without a drop-in of ours to place, every file counts, the last one winning.
    whole = effective(dirs, "ss.service")
    assert (whole["limit"], whole["source"], whole["after"]) == (DEFAULT, later, [])
    assert whole["files"] == [str(unit), override, shipped, late, later]


def test_a_unit_without_limit_gets_the_default(dirs):
    (dirs[2] / "ss.service").write_text("[Service]\nExecStart=/bin/true\n[Install]\nLimitNOFILE=7\n")
    # LimitNOFILE outside [Service] is not the service's.
    got = effective(dirs, "ss.service")
    assert (got["limit"], got["source"], got["after"]) == (DEFAULT, "DefaultLimitNOFILE", [])
    assert (got["before"], got["before_source"]) == (DEFAULT, "DefaultLimitNOFILE")


# --------------------------------------------------------------------------
# LimitNOFILE values
# --------------------------------------------------------------------------
@pytest.mark.parametrize("text, pair", [
    ("4096", (4096, 4096)),
    ("1024:524288", (1024, 524288)),
    ("infinity", (NR_OPEN, NR_OPEN)),
    ("1024:infinity", (1024, NR_OPEN)),
    ("  8192  ", (8192, 8192)),
    ("", None),  # a reset to DefaultLimitNOFILE
])
def test_parse_limit(text, pair):
    assert units.parse_limit(text, NR_OPEN) == pair


@pytest.mark.parametrize("text", ["lots", "1:2:3", "-1", "1024:", "4k"])
def test_a_limit_systemd_cannot_parse_is_an_error_naming_the_file(dirs, text):
    with pytest.raises(ValueError):
        units.parse_limit(text, NR_OPEN)
    bad = put(dirs[0], "ss.service", "override.conf", limit(text))
    (dirs[2] / "ss.service").write_text("[Service]\n")
    with pytest.raises(ValueError) as err:
        effective(dirs, "ss.service")
    assert str(err.value).startswith(f"{bad}: LimitNOFILE={text}: ")


def test_assignments_reads_every_value_of_the_service_section_in_order():
    text = ("[Unit]\nLimitNOFILE=1\n[Service]\n# LimitNOFILE=2\nLimitNOFILE = 3\n  LimitNOFILE=4  \n"
            "DefaultLimitNOFILE=5\n[Install]\nLimitNOFILE=6\n[Service]\nLimitNOFILE=7\n")
    assert units.assignments(text) == ["3", "4", "7"]
    assert units.assignments(text, "DefaultLimitNOFILE") == ["5"]
    assert units.assignments(None) == []


def test_default_limit_from_system_conf_and_its_dropins(tmp_path):
    conf, conf_dir = tmp_path / "system.conf", tmp_path / "system.conf.d"
    system = (str(conf), str(conf_dir))
    assert units.default_limit(NR_OPEN, system) == DEFAULT  # neither exists: systemd's own default
    conf.write_text("[Manager]\n#DefaultLimitNOFILE=1:2\n")
    assert units.default_limit(NR_OPEN, system) == DEFAULT
    conf.write_text("[Manager]\nDefaultLimitNOFILE=2048:65536\n")
    assert units.default_limit(NR_OPEN, system) == (2048, 65536)
    conf_dir.mkdir()
    (conf_dir / "20-b.conf").write_text("[Manager]\nDefaultLimitNOFILE=8192\n")
    (conf_dir / "10-a.conf").write_text("[Manager]\nDefaultLimitNOFILE=4096\n")
    (conf_dir / "30-c.txt").write_text("[Manager]\nDefaultLimitNOFILE=1\n")  # not *.conf
    assert units.default_limit(NR_OPEN, system) == (8192, 8192)  # the last in name order wins
    (conf_dir / "40-d.conf").write_text("[Manager]\nDefaultLimitNOFILE=\n")  # a reset
    assert units.default_limit(NR_OPEN, system) == DEFAULT
    (conf_dir / "40-d.conf").write_text("[Manager]\nDefaultLimitNOFILE=infinity\n")
    assert units.default_limit(NR_OPEN, system) == (NR_OPEN, NR_OPEN)
    (conf_dir / "50-e.conf").write_text("[Service]\nDefaultLimitNOFILE=3\n")  # not [Manager]
    assert units.default_limit(NR_OPEN, system) == (NR_OPEN, NR_OPEN)


def test_render_dropin_is_one_value_when_soft_and_hard_agree():
    text = units.render_dropin(51200, 51200, "ss.service")
    assert text.startswith("# Open-file limit of ss.service, managed by Salt (shadowsocks_tuning)")
    assert text.endswith("[Service]\nLimitNOFILE=51200\n")
    assert units.assignments(text) == ["51200"]
    split = units.render_dropin(4096, 524288, "ss.service")
    assert units.assignments(split) == ["4096:524288"]
    assert units.parse_limit(units.assignments(split)[0], NR_OPEN) == (4096, 524288)


def test_show_reads_systemctl_s_merged_values():
    """``systemctl show`` output as systemd 252 prints it (a stand-in for the
    command: the real one runs in tests/integration/test_systemd_harness.py)."""
    output = ("Id=ss.service\nLoadState=loaded\nLimitNOFILESoft=1024\nLimitNOFILE=524288\n\n"
              f"Id=xray.service\nLoadState=loaded\nLimitNOFILESoft={2**64 - 1}\nLimitNOFILE=infinity\n\n"
              "Id=gone.service\nLoadState=not-found\nLimitNOFILESoft=1024\nLimitNOFILE=4096\n")
    calls = []

    def run(argv):
        calls.append(argv)
        return 0, output

    got = units.show(run, "systemctl", ["ss.service", "xray.service", "gone.service", "ss-server@.service"], NR_OPEN)
    assert {unit: shown["limit"] for unit, shown in got.items()} == {
        "ss.service": (1024, 524288), "xray.service": (NR_OPEN, NR_OPEN)}
    assert not got["ss.service"]["reload"] and got["ss.service"]["dropins"] == []
    (argv,) = calls
    assert argv[-4:] == ["--", "ss.service", "xray.service", "gone.service"]  # a template is not a unit to show
    assert units.show(lambda argv: (1, ""), "systemctl", ["ss.service"], NR_OPEN) == {}


def test_dash_prefix_and_type_dropins_apply_and_the_more_specific_hides_the_same_name(tmp_path):
    etc = tmp_path / "etc"
    for rel, text in {
        "shadowsocks-libev-server@.service": "[Service]\nExecStart=/bin/true\n",
        "service.d/10-all.conf": "[Service]\nLimitNOFILE=2048\n",
        "shadowsocks-.service.d/20-ss.conf": "[Service]\nLimitNOFILE=3072\n",
        "shadowsocks-libev-.service.d/10-all.conf": "[Service]\nLimitNOFILE=4096\n",
    }.items():
        (etc / rel).parent.mkdir(parents=True, exist_ok=True)
        (etc / rel).write_text(text)
    found = units.dropins([str(etc)], "shadowsocks-libev-server@a.service")
    assert found == [str(etc / "shadowsocks-libev-.service.d/10-all.conf"), str(etc / "shadowsocks-.service.d/20-ss.conf")]
    result = units.effective([str(etc)], "shadowsocks-libev-server@a.service", 1048576, (1024, 524288))
    assert result["limit"] == (3072, 3072)
