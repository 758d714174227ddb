"""The ports today's shadowsocks servers are configured to listen on, read
from configs in the exact shapes their projects document or ship (each
test says where its shape comes from), written to real files; and the
readers under them: strict JSON, JSON5 (and JSON5 with ``#`` comments for
Xray, v2ray and sing-box), YAML, the field-path language, and which files
are read at all (a named pipe in the config directory must not hang)."""

import json
import os
import threading

import pytest
import yaml

import sstuning_configs as configs
import sstuning_daemons as daemons

# The format and port fields per kind of server, from the daemon registry,
# under the servers' own names.
SHAPES = {server: (daemons.KINDS[kind]["configs"]["format"], daemons.KINDS[kind]["configs"]["ports"])
          for server, kind in (("shadowsocks-libev", "shadowsocks_libev"), ("shadowsocks-rust", "shadowsocks_rust"),
                               ("outline-ss-server", "outline"), ("xray", "xray"), ("v2ray", "v2ray"),
                               ("sing-box", "sing_box"))}
import sstuning_ports
import sstuning_daemons
import sstuning_settings
import sstuning_sysctl

def libev_dir_ports(config_dir):
    """The ports of shadowsocks-libev's configs in ``config_dir`` (minion
    option ss_config_dir), as a run finds them."""
    options = sstuning_settings.options({"shadowsocks_tuning.ss_config_dir": str(config_dir)}.get)
    kinds = {"shadowsocks_libev": sstuning_daemons.KINDS["shadowsocks_libev"]}
    return sstuning_sysctl.config_ports(options, kinds)


FMT = {kind: shape[0] for kind, shape in SHAPES.items()}
FIELDS = {kind: shape[1] for kind, shape in SHAPES.items()}


def ports_of(kind, tmp_path, text, name="config.json"):
    """{port: label} that config_ports finds in ``text`` written to a real file."""
    path = tmp_path / name
    path.write_text(text)
    found = configs.config_ports(str(path), FMT[kind], FIELDS[kind])
    return {port: label.split(" (", 1)[1][:-1] for port, label in found.items()}


# ---------------------------------------------------------------------------
# shadowsocks-libev
# ---------------------------------------------------------------------------
def test_libev_configs_through_the_old_entry_point(tmp_path):
    # Debian's shadowsocks-libev 3.3.5 ships /etc/shadowsocks-libev/config.json
    # in this shape (a list of servers; the password is made at install).
    (tmp_path / "config.json").write_text(
        '{\n    "server":["::1", "127.0.0.1"],\n    "mode":"tcp_and_udp",\n    "server_port":8388,\n'
        '    "local_port":1080,\n    "password":"cmbwGIDp6avF",\n    "timeout":86400,\n'
        '    "method":"chacha20-ietf-poly1305"\n}\n')
    # ss-manager(1) and jconf.c: port_password maps ports to passwords,
    # manager_address is "host:port" or a UNIX socket path; shadowsocks-libev(8)
    # CONFIG FILE writes ports as strings ("server_port": "1234").
    (tmp_path / "manager.json").write_text(json.dumps({
        "server": "0.0.0.0", "method": "aes-256-gcm", "manager_address": "127.0.0.1:6001",
        "port_password": {"8001": "one", "8002": "two"}}))
    (tmp_path / "strings.json").write_text('{"server_port": "1234", "local_port": "4321", '
                                           '"manager_address": "/var/run/shadowsocks-manager.sock"}')
    (tmp_path / "commented.json").write_text('{"server_port": 7777 // libev\'s parser has no comments\n}')
    (tmp_path / "notes.txt").write_text('{"server_port": 9999}')
    found = libev_dir_ports(str(tmp_path))
    assert found == {
        8388: f"{tmp_path}/config.json (server_port)", 1080: f"{tmp_path}/config.json (local_port)",
        6001: f"{tmp_path}/manager.json (manager_address)", 8001: f"{tmp_path}/manager.json (port_password.*)",
        8002: f"{tmp_path}/manager.json (port_password.*)", 1234: f"{tmp_path}/strings.json (server_port)",
        4321: f"{tmp_path}/strings.json (local_port)",
    }
    assert libev_dir_ports(str(tmp_path / "missing")) == {}


def test_a_config_directory_name_is_not_a_pattern(tmp_path):
    odd = tmp_path / "ss[1]"
    odd.mkdir()
    (odd / "config.json").write_text('{"server_port": 8388}')
    assert set(libev_dir_ports(str(odd))) == {8388}


# ---------------------------------------------------------------------------
# shadowsocks-rust (JSON5)
# ---------------------------------------------------------------------------
def test_rust_debian_package_config(tmp_path):
    # shadowsocks-rust's debian/config.json, installed as /etc/shadowsocks-rust/config.json.
    text = ('{\n    "server": "0.0.0.0",\n    "server_port": 8388,\n    "local_address": "127.0.0.1",\n'
            '    "local_port": 1080,\n    "password": "barfoo",\n    "timeout": 300,\n'
            '    "method": "chacha20-ietf-poly1305"\n}\n')
    assert ports_of("shadowsocks-rust", tmp_path, text) == {8388: "server_port", 1080: "local_port"}


def test_rust_readme_extended_format_with_comments(tmp_path):
    # README "Getting Started": the extended format, `servers` with one
    # disabled, and // comments.
    text = """{
    "servers": [
        {
            "server": "127.0.0.1",
            "server_port": 8388,
            "password": "rwQc8qPXVsRpGx3uW+Y3Lj4Y42yF9Bs0xg1pmx8/+bo=",
            "method": "aes-256-gcm",
            "timeout": 7200
        },
        {
            "server": "127.0.0.1",
            "server_port": 8389,
            "password": "/dliNXn5V4jg6vBW4MnC1I8Jljg9x7vSihmk6UZpRBM=",
            "method": "chacha20-ietf-poly1305"
        },
        {
            "disabled": true,
            "server": "eg.disable.me",
            "server_port": 8390,
            "password": "mGvbWWay8ueP9IHnV5F1uWGN2BRToiVCAWJmWOTLU24=",
            "method": "chacha20-ietf-poly1305"
        }
    ],
    // ONLY FOR `sslocal`
    // Delete these lines if you are running `ssserver` or `ssmanager`
    "local_port": 1080,
    "local_address": "127.0.0.1"
}
"""
    assert ports_of("shadowsocks-rust", tmp_path, text) == {
        8388: "servers[].server_port", 8389: "servers[].server_port", 8390: "servers[].server_port",
        1080: "local_port"}


def test_rust_readme_configuration_locals_servers_and_manager(tmp_path):
    # README "Configuration", abridged: `locals` (local_port, local_udp_port),
    # `servers` by `address`/`port` and by `server`/`server_port`, trailing
    # commas after the last member, comments after values, manager_address
    # (an IP) with manager_port.
    text = """{
    // LOCAL: Listen address. This is exactly the same as `locals[0]`
    "local_address": "127.0.0.1",
    "local_port": 1080,
    "locals": [
        {
            "local_address": "127.0.0.1",
            "local_port": 1080,
            "mode": "tcp_and_udp",
        },
        {
            "protocol": "socks",
            "local_address": "127.0.0.1",
            "local_port": 1081,
            "local_udp_address": "127.0.0.1",
            "local_udp_port": 2081
        },
        {
            "protocol": "tunnel",
            "local_address": "127.0.0.1",
            "local_port": 5353,
            "forward_address": "8.8.8.8",
            "forward_port": 53,
        },
        {
            "protocol": "http",
            "local_address": "127.0.0.1",
            "local_port": 3128,
            "http_auth_config_path": "/path/to/auth.json",
        },
        {
            "protocol": "tun",
            "tun_interface_name": "tun0",
            "tun_interface_address": "10.255.0.1/24"
        }
    ],
    // listen on :: for dual stack support, no need add [] around.
    "server": "::",
    "server_port": 8388,
    "plugin_args": [
        // Each line is an argument passed to "plugin"
        "--verbose"
    ],
    "plugin_mode": "tcp_and_udp", // SIP003u, default is "tcp_only"
    "servers": [
        {
            // "disabled": true,
            "address": "0.0.0.0",
            "port": 8389,
            "plugin_args": [],
            "acl": "/path/to/acl/file.acl",
        },
        {
            // Same key as basic format "server" and "server_port"
            "server": "0.0.0.0",
            "server_port": 8388,
            "password": "${PASSWORD_FROM_ENV}"
        },
        {
            "server": "::",
            "server_port": 8390,
            "users": [
                {
                    "name": "username",
                    "password": "4w0GKJ9U3Ox7CIXGU4A3LDQAqP6qrp/tUi/ilpOR9p4="
                }
            ],
            // "password": "3SYJ/f8nmVuzKvKglykRQDSgg10e/ADilkdRWrrY9HU=:4w0GKJ9U3Ox7CIXGU4A3LDQAqP6qrp/tUi/ilpOR9p4="
        },
        {
            "outbound_proxy": "socks5://127.0.0.1:1080",
            // "outbound_proxy": [
            //     "socks5://user:pass@127.0.0.1:1080",
            // ],
        }
    ],
    "udp_timeout": 300, // Timeout for UDP associations (in seconds), 5 minutes by default
    "manager_address": "127.0.0.1", // Could be a path to UNIX socket, /tmp/shadowsocks-manager.sock
    "manager_port": 5300, // Not needed for UNIX socket
}
"""
    assert ports_of("shadowsocks-rust", tmp_path, text) == {
        8388: "server_port", 1080: "local_port", 8389: "servers[].port", 8390: "servers[].server_port",
        1081: "locals[].local_port", 5353: "locals[].local_port", 3128: "locals[].local_port",
        2081: "locals[].local_udp_port", 5300: "manager_port"}


def test_rust_readme_ssmanager_config(tmp_path):
    # README "Server Manager": manager_address twice (the later, a UNIX
    # socket, wins as in every JSON reader), manager_port, an empty
    # `servers` that holds only a comment.
    text = """{
    // Required option
    // Address that ssmanager is listening on
    "manager_address": "127.0.0.1",
    "manager_port": 6100,

    // Or bind to a Unix Domain Socket
    "manager_address": "/tmp/shadowsocks-manager.sock",

    "servers": [
        // These servers will be started automatically when ssmanager is started
    ],

    // Outbound socket binds to this IP address
    // For choosing different network interface on the same machine
    "local_address": "xxx.xxx.xxx.xxx",

    // Other options that may be passed directly to new servers
}
"""
    assert configs.loads(text, "json5")["manager_address"] == "/tmp/shadowsocks-manager.sock"
    assert ports_of("shadowsocks-rust", tmp_path, text) == {6100: "manager_port"}


# ---------------------------------------------------------------------------
# outline-ss-server (YAML)
# ---------------------------------------------------------------------------
def test_outline_keys_format(tmp_path):
    # config_example.yml before v1.7: one port per key, keys sharing a port.
    text = """keys:
  - id: user-0
    port: 9000
    cipher: chacha20-ietf-poly1305
    secret: Secret0
    rate_limit: 128000

  - id: user-1
    port: 9000
    cipher: chacha20-ietf-poly1305
    secret: Secret1
    rate_limit: 128000

  - id: user-2
    port: 9001
    cipher: chacha20-ietf-poly1305
    secret: Secret2
    rate_limit: 128000
"""
    assert ports_of("outline-ss-server", tmp_path, text, "config.yml") == {9000: "keys[].port", 9001: "keys[].port"}


def test_outline_services_format(tmp_path):
    # cmd/outline-ss-server/config_example.yml as released in v1.7.0.
    text = """services:
  - listeners:
      # TODO(sbruens): Allow a string-based listener config, as a convenient short-form
      # to create a direct listener, e.g. `- tcp/[::]:9000`.
      - type: tcp
        address: "[::]:9000"
      - type: udp
        address: "[::]:9000"
    keys:
        - id: user-0
          cipher: chacha20-ietf-poly1305
          secret: Secret0
        - id: user-1
          cipher: chacha20-ietf-poly1305
          secret: Secret1

  - listeners:
      - type: tcp
        address: "[::]:9001"
      - type: udp
        address: "[::]:9001"
    keys:
        - id: user-2
          cipher: chacha20-ietf-poly1305
          secret: Secret2
"""
    assert ports_of("outline-ss-server", tmp_path, text, "config.yml") == {
        9000: "services[].listeners[].address", 9001: "services[].listeners[].address"}


def test_outline_websocket_format(tmp_path):
    # cmd/outline-ss-server/config_example.yml since v1.9.0 (abridged):
    # a web server for the WebSocket listeners, and a dialer.
    text = """web:
  servers:
    - id: my_web_server
      listen:
        - "127.0.0.1:8000"

services:
  - listeners:
      - type: tcp
        address: "[::]:9000"
      - type: udp
        address: "[::]:9000"
      - type: websocket-stream
        web_server: my_web_server
        path: "/SECRET/tcp"  # Prevent probing by serving under a secret path.
    keys:
      - id: user-0
        cipher: chacha20-ietf-poly1305
        secret: Secret0
    dialer:
      fwmark: 0
  - listeners:
      - type: tcp
        address: "tcp://[::]:9001"
    keys:
      - id: user-2
        cipher: chacha20-ietf-poly1305
        secret: Secret2
"""
    assert ports_of("outline-ss-server", tmp_path, text, "config.yml") == {
        8000: "web.servers[].listen[]", 9000: "services[].listeners[].address",
        9001: "services[].listeners[].address"}


# ---------------------------------------------------------------------------
# Xray, v2ray, sing-box (JSON with comments)
# ---------------------------------------------------------------------------
def test_xray_shadowsocks_2022_server_and_client(tmp_path):
    # XTLS/Xray-examples, Shadowsocks-2022/README.ENG.md: the server, and a
    # client whose socks/http inbounds are not shadowsocks (and whose
    # outbound's 1234 is the remote server's).
    server = """{
   "inbounds": [
     {
       "port": 1234,
       "protocol": "shadowsocks",
       "settings": {
         "method": "2022-blake3-aes-128-gcm",
         "password": "{{ psk }}",
         "network": "tcp,udp"
       }
     }
   ],
   "outbounds": [
     {
       "protocol": "freedom"
     }
   ]
}"""
    client = """{
   "inbounds": [
     {"port": 10801, "protocol": "socks", "settings": {"udp": true}},
     {"port": 10802, "protocol": "http"}
   ],
   "outbounds": [
     {"protocol": "shadowsocks", "settings": {"servers": [
       {"address": "{{ host }}", "port": 1234, "method": "2022-blake3-aes-128-gcm", "password": "{{ psk }}"}]}}
   ]
}"""
    assert ports_of("xray", tmp_path, server) == {1234: "inbounds[protocol=shadowsocks].port"}
    assert ports_of("xray", tmp_path, client, "client.json") == {}
    # Xray's reader (infra/conf/json/reader.go) strips //, /* */ and # comments.
    commented = server.replace('"port": 1234,', '"port": 1234, # the port\n /* more */ // and more')
    assert ports_of("xray", tmp_path, commented, "commented.json") == {1234: "inbounds[protocol=shadowsocks].port"}


def test_v2ray_debian_12(tmp_path):
    # Debian 12's v2ray 4.34.0+ds-1: postinst writes /etc/v2ray/config.json
    # from /usr/share/v2ray/config_vmess.json (a vmess inbound: not ours).
    vmess = """{
  "inbounds": [{
    "port": 10086,
    "protocol": "vmess",
    "settings": {
      "clients": [
        {
          "id": "23ad6b10-8d1a-40f7-8ad0-e3e35cd38297",
          "level": 1,
          "alterId": 64
        }
      ]
    }
  }],
  "outbounds": [{
    "protocol": "freedom",
    "settings": {}
  },{
    "protocol": "blackhole",
    "settings": {},
    "tag": "blocked"
  }]
}
"""
    assert ports_of("v2ray", tmp_path, vmess) == {}
    # /usr/share/v2ray/config.json (abridged): comments before the object,
    # here with a shadowsocks inbound added (v2ray 4's ShadowsocksInboundObject;
    # v2ray lower-cases the protocol before looking it up).
    example = """// Config file of V2Ray. This file follows standard JSON format, with comments support.
// Uncomment entries below to satisfy your needs. Also read our manual for more detail at
// https://www.v2ray.com/
{
  "log": {
    // By default, V2Ray writes access log to stdout.
    // "access": "/path/to/access/log/file",
    "loglevel": "warning"
  },
  // List of inbound proxy configurations.
  "inbounds": [{
    // Port to listen on. You may need root access if the value is less than 1024.
    "port": 1080,
    "listen": "127.0.0.1",
    "tag": "socks-inbound",
    "protocol": "socks",
    "settings": {"auth": "noauth", "udp": false, "ip": "127.0.0.1"}
  }, {
    "port": 8388,
    "protocol": "Shadowsocks",
    "settings": {"method": "chacha20-ietf-poly1305", "password": "x", "network": "tcp,udp"}
  }, {
    "port": "10000-10003",
    "protocol": "shadowsocks",
    "settings": {"method": "aes-128-gcm", "password": "y"}
  }, {
    "port": "env:SS_PORT",
    "protocol": "shadowsocks",
    "settings": {"method": "aes-128-gcm", "password": "z"}
  }],
  // Api enables gRPC APIs for external programs to communicate with V2Ray instance.
  //"api": {
    //"tag": "api",
  //},
  "other": {}
}
"""
    found = ports_of("v2ray", tmp_path, example, "example.json")
    assert found == {port: "inbounds[protocol=shadowsocks].port" for port in (8388, 10000, 10001, 10002, 10003)}
    # v2ray 4 still reads v3's single "inbound" and "inboundDetour".
    legacy = '{"inbound": {"port": 8390, "protocol": "shadowsocks"}, ' \
             '"inboundDetour": [{"port": 8391, "protocol": "shadowsocks"}, {"port": 8392, "protocol": "vmess"}]}'
    assert set(ports_of("v2ray", tmp_path, legacy, "legacy.json")) == {8390, 8391}


def test_sing_box_shadowsocks_inbound(tmp_path):
    # sing-box docs, "Shadowsocks" examples (single user): the server's
    # inbound, and a client's mixed inbound that is not shadowsocks.
    server = """{
  "inbounds": [
    {
      "type": "shadowsocks",
      "listen": "::",
      "listen_port": 8080,
      "network": "tcp",
      "method": "2022-blake3-aes-128-gcm",
      "password": "8JCsPssfgS8tiRwiMlhARg=="
    }
  ]
}"""
    client = """{
  "inbounds": [
    {
      "type": "mixed",
      "listen": "::",
      "listen_port": 2080
    }
  ],
  "outbounds": [
    {
      "type": "shadowsocks",
      "server": "127.0.0.1",
      "server_port": 8080,
      "method": "2022-blake3-aes-128-gcm",
      "password": "8JCsPssfgS8tiRwiMlhARg=="
    }
  ]
}"""
    assert ports_of("sing-box", tmp_path, server) == {8080: "inbounds[type=shadowsocks].listen_port"}
    assert ports_of("sing-box", tmp_path, client, "client.json") == {}


# ---------------------------------------------------------------------------
# Values and fields
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("value, expected", [
    (8388, {8388}), ("8388", {8388}), ("127.0.0.1:6001", {6001}), ("[::]:9000", {9000}), ("[::1]:9000", {9000}),
    ("tcp://[::]:9000", {9000}), ("udp://0.0.0.0:53", {53}), (":8388", {8388}), ("localhost:80", {80}),
    ("10000-10002", {10000, 10001, 10002}), ("80,443,1000-1001", {80, 443, 1000, 1001}),
    # Not ports: a bare IPv6 address, an address, a socket path, an
    # unresolved environment variable, out of range, floats and booleans,
    # digits that are not ASCII, a reversed range, a list.
    ("::1", set()), ("127.0.0.1", set()), ("/tmp/ss.sock", set()), ("env:PORT", set()), (0, set()),
    (65536, set()), ("70000", set()), (-1, set()), (8388.0, set()), (True, set()), ("\uff18\uff13\uff18\uff18", set()),
    ("20-10", set()), ([8388], set()), (None, set()), ("8388 ", set()), ("", set()),
])
def test_what_counts_as_a_port(value, expected):
    assert set(configs.ports({"port": value}, ["port"])) == expected


def test_a_wide_range_is_capped_and_says_so():
    found = configs.ports({"inbounds": [{"protocol": "shadowsocks", "port": "10000-20000"}]},
                          FIELDS["xray"])
    assert sorted(found) == list(range(10000, 10000 + configs.MAX_RANGE))
    assert found[10000] == "inbounds[protocol=shadowsocks].port, range 10000-20000 capped at its first 1024 ports"
    assert len(configs.ports({"port": ",".join(["1-1000"] * 5)}, ["port"])) == 1000  # one value gives at most 1024


def test_field_paths():
    data = {"a": {"b": [{"c": 1}, {"c": "2"}, {"d": 3}, 4]}, "m": {"5": "x", 6: "y", "z": 0},
            "l": [{"t": "SS", "p": 7}, {"t": "other", "p": 8}, {"p": 9}], "s": ["10", 11]}
    assert set(configs.ports(data, ["a.b[].c"])) == {1, 2}
    assert set(configs.ports(data, ["m.*"])) == {5, 6}
    assert set(configs.ports(data, ["l[t=ss].p"])) == {7}
    assert set(configs.ports(data, ["s[]"])) == {10, 11}
    assert configs.ports(data, ["missing", "a.missing[].c", "a.b.c", "s.x"]) == {}
    assert configs.ports([1, 2], ["x"]) == {}
    assert configs.ports(data, ["a.b[].c", "l[t=ss].p"])[2] == "a.b[].c"  # the first field to name a port keeps it


@pytest.mark.parametrize("field", ["", "a..b", "*", "a.*.b", "a[", "a[b]", "a[=x]", "a[b=]", "a b", 5, None])
def test_a_malformed_field_is_refused_by_name(field, tmp_path):
    with pytest.raises(ValueError, match=r"port field"):
        configs.ports({}, [field])
    with pytest.raises(ValueError, match=r"port field"):
        configs.config_ports(str(tmp_path / "*.json"), "json", [field])  # the caller's mistake: raised


def test_an_unknown_format_is_refused():
    with pytest.raises(ValueError, match=r"format 'toml' is unknown; use one of json, json5, jsonc, yaml"):
        configs.loads("", "toml")
    with pytest.raises(ValueError, match=r"format 'toml' is unknown"):
        configs.config_ports("/nonexistent/*.toml", "toml", ["port"])


# ---------------------------------------------------------------------------
# Which files are read
# ---------------------------------------------------------------------------
def test_only_regular_files_are_read_and_nothing_blocks(tmp_path):
    config_dir = tmp_path / "etc"
    config_dir.mkdir()
    (config_dir / "a.json").write_text('{"server_port": 1001}')
    os.mkfifo(config_dir / "b.json")  # nobody writes to it: opening it for reading must not wait
    (config_dir / "c.json").mkdir()
    (config_dir / "d.json").symlink_to(tmp_path / "nowhere.json")
    real = tmp_path / "elsewhere.json"
    real.write_text('{"server_port": 1005}')
    (config_dir / "e.json").symlink_to(real)  # read through a link: configs are read, never written
    (config_dir / "f.json").write_text('{"server_port": 1006, ' + '"pad": "' + "x" * configs.MAX_BYTES + '"}')
    (config_dir / "g.json").write_text('{"server_port": 1007,,}')
    (config_dir / ".h.json").write_text('{"server_port": 1008}')  # hidden, as `*` leaves it
    (config_dir / "i.json").write_text("")
    outcome = {}

    def scan():
        skipped = []
        outcome["found"] = configs.config_ports([str(config_dir / "*.json")], "json", ["server_port"], skipped)
        outcome["skipped"] = skipped

    reader = threading.Thread(target=scan, daemon=True)
    reader.start()
    reader.join(timeout=30)
    assert not reader.is_alive(), "reading the config directory blocked (on the named pipe?)"
    assert outcome["found"] == {1001: f"{config_dir}/a.json (server_port)",
                                1005: f"{config_dir}/e.json (server_port)"}
    why = "\n".join(outcome["skipped"])
    assert f"{config_dir}/b.json is a named pipe" in why
    assert f"{config_dir}/c.json is a directory" in why
    assert f"{config_dir}/d.json: a symbolic link to {tmp_path}/nowhere.json, which does not exist" in why
    assert f"{config_dir}/f.json is over {configs.MAX_BYTES} bytes" in why
    assert f"{config_dir}/g.json: line 1 column 22: Expecting property name" in why
    assert f"{config_dir}/i.json: line 1 column 1: Expecting value" in why
    assert len(outcome["skipped"]) == 6


def test_paths_and_globs_mix_in_order_and_a_missing_directory_is_nothing(tmp_path):
    (tmp_path / "b.json").write_text('{"port": 2}')
    (tmp_path / "a.json").write_text('{"port": 2, "other": 1}')
    (tmp_path / "z.conf").write_text('{"port": 3}')
    found = configs.config_ports([str(tmp_path / "*.json"), str(tmp_path / "z.conf"), str(tmp_path / "a.json"),
                                  str(tmp_path / "none.json")], "json", ["port", "other"])
    assert found == {2: f"{tmp_path}/a.json (port)", 1: f"{tmp_path}/a.json (other)", 3: f"{tmp_path}/z.conf (port)"}
    skipped = []
    assert configs.config_ports([str(tmp_path / "missing" / "*.json"), str(tmp_path / "missing.json")],
                                "json5", ["port"], skipped) == {}
    assert skipped == []  # a server that is not installed is no news


# ---------------------------------------------------------------------------
# The readers
# ---------------------------------------------------------------------------
JSON5_VALUES = [
    # Comments never start inside strings, and strings never inside comments.
    ('{"url": "http://example.com//x", \'c\': "/* not a comment */"}',
     {"url": "http://example.com//x", "c": "/* not a comment */"}),
    ('[1, // "a string? no: a comment\n 2 /* \'neither\' */]', [1, 2]),
    ('["a//b", \'a/*b\', "*/"]', ["a//b", "a/*b", "*/"]),
    ("/**/ /***/ /* ** / */ 1 /*/ */", 1),
    # Trailing commas, bare and quoted names, reserved words as names.
    ("{a: 1, $b_2: [1, 2,], 'c d': {}, }", {"a": 1, "$b_2": [1, 2], "c d": {}}),
    ("{null: 1, true: 2, Infinity: 3, NaN: 4, if: 5}", {"null": 1, "true": 2, "Infinity": 3, "NaN": 4, "if": 5}),
    # A name that starts like a number word (found by comparing with json5 2.2.3, the reference reader).
    ("{Infinity\u0301: 1, NaNa: 2, true_: 3}", {"Infinity\u0301": 1, "NaNa": 2, "true_": 3}),
    ("{caf\u00e9: 1, \u0394x: 2, a\u0301: 3, \\u0061b: 4, x\u200dy: 5}",
     {"caf\u00e9": 1, "\u0394x": 2, "a\u0301": 3, "ab": 4, "x\u200dy": 5}),
    # Numbers.
    ("[0x1F, -0xff, +1, .5, 5., -.5e1, 1e3, 0, -0, 1E-2, +Infinity, -Infinity]",
     [31, -255, 1, 0.5, 5.0, -5.0, 1000.0, 0, 0, 0.01, float("inf"), float("-inf")]),
    # Strings: both quotes, escapes, line continuations, raw separators.
    (r"""['it\'s', "say \"hi\"", '\x41\u00e9\ud83d\ude00', '\0\b\f\n\r\t\v\\\/\a']""",
     ["it's", 'say "hi"', "A\u00e9\U0001F600", "\0\b\f\n\r\t\v\\/a"]),
    ("'line \\\none' + 'x'".split(" + ")[0], "line one"),
    ("'crlf \\\r\nok'", "crlf ok"),
    ("\"u2028 \u2028 and tab \t raw\"", "u2028 \u2028 and tab \t raw"),
    # Whitespace JSON5 knows and JSON does not.
    ("\ufeff\v\f\u00a0\u3000{\u2028a\u2029:\u20001}", {"a": 1}),
]


@pytest.mark.parametrize("text, value", JSON5_VALUES)
def test_json5_values(text, value):
    assert configs.loads(text, "json5") == value
    assert configs.loads(text, "jsonc") == value


def test_json5_nan():
    value = configs.loads("[NaN, -NaN, +NaN]", "json5")
    assert all(item != item for item in value)


JSON5_ERRORS = [
    ("", "line 1 column 1: expected a value, found the end of the text"),
    ("{a: 1\n,, }", "line 2 column 2: expected a member name or '}'"),
    ("[,]", "line 1 column 2: expected a value or ']'"),
    ("[1 2]", "line 1 column 4: expected ',' or ']'"),
    ("{a 1}", "line 1 column 4: expected ':'"),
    ("01", "line 1 column 1: expected a value, found '01'"),
    ("0x", "line 1 column 1: expected a value"),
    ("1.2.3", "line 1 column 4: expected the end of the text"),
    ("+", "line 1 column 1: unexpected '+'"),
    ("undefined", "line 1 column 1: expected a value, found 'undefined'"),
    ("{1a: 1}", "line 1 column 2: '1a' is not a valid member name (quote it)"),
    ("{a\\x41: 1}", "line 1 column 3: unexpected '\\\\x41: 1}'"),
    ("{'a\nb': 1}", "line 1 column 2: a string that does not end on its line"),
    ('"abc', "line 1 column 1: a string that does not end on its line"),
    ('\n  "\\1"', "line 2 column 4: invalid escape '\\\\1' in a string"),
    ('"\\01"', "line 1 column 2: invalid escape '\\\\0'"),
    ('"\\x4"', "line 1 column 2: invalid escape '\\\\x'"),
    ('"\\u12"', "line 1 column 2: invalid escape '\\\\u'"),
    ("[1] /* never closed", "line 1 column 5: a '/*' comment that never ends with '*/'"),
    ("[1] # a comment in jsonc only", "line 1 column 5: unexpected '# a comment '"),
    # (Plain JSON goes to Python's json first, which nests deeper: the comment makes this JSON5.)
    ("[" * (configs.MAX_DEPTH + 1) + "]" * (configs.MAX_DEPTH + 1) + " // deep",
     f"line 1 column {configs.MAX_DEPTH + 1}: nested deeper than {configs.MAX_DEPTH} levels"),
    ("- 1", "line 1 column 1: unexpected '- 1'"),
    ("{} {}", "line 1 column 4: expected the end of the text"),
]


@pytest.mark.parametrize("text, message", JSON5_ERRORS)
def test_json5_errors_name_line_and_column(text, message):
    with pytest.raises(ValueError) as caught:
        configs.loads(text, "json5")
    assert str(caught.value).startswith(message), str(caught.value)


def test_deep_nesting_is_refused_not_recursed():
    deep = "[" * 100_000 + "]" * 100_000
    for fmt in ("json", "json5", "jsonc", "yaml"):
        with pytest.raises(ValueError, match=r"nested deeper than 256 levels|nesting depth"):
            configs.loads(deep, fmt)
    assert configs.loads("[" * configs.MAX_DEPTH + "]" * configs.MAX_DEPTH, "yaml") is not None
    nested = "[" * configs.MAX_DEPTH + "1" + "]" * configs.MAX_DEPTH + " // deep"
    assert configs.loads(nested, "json5") is not None


def test_strict_json():
    assert configs.loads('{"a": [1, 2.5, "x", true, null]}', "json") == {"a": [1, 2.5, "x", True, None]}
    for text, message in [('{"a": 1,}', "line 1 column 9: Expecting property name"),
                          ('{"a": 1} // c', "line 1 column 10: Extra data"),
                          ("{a: 1}", "line 1 column 2: Expecting property name"),
                          ('[1,\n NaN]', "line 2 column 2: NaN is not JSON"),
                          ('[-Infinity]', "line 1 column 2: -Infinity is not JSON"),
                          ('"\t"', "line 1 column 2: Invalid control character")]:
        with pytest.raises(ValueError) as caught:
            configs.loads(text, "json")
        assert str(caught.value).startswith(message), str(caught.value)


@pytest.mark.parametrize("text, message", [
    ("a: !!binary aGk=", "line 1 column 4: 'tag:yaml.org,2002:binary' values are not read"),
    ("a:\n  - !!set {x}", "line 2 column 5: 'tag:yaml.org,2002:set' values are not read"),
    ("!!omap [a: 1]", "line 1 column 1: 'tag:yaml.org,2002:omap' values are not read"),
    ("a: !!python/object/apply:os.system [id]", "line 1 column 4: 'tag:yaml.org,2002:python/object/apply:os.system'"),
    ("a: !local x", "line 1 column 4: '!local' values are not read"),
    ("a: &x [1, *x]", "line 1 column 4: an alias to a node that contains it"),
    ("a: [1\n", "line 2 column 1: did not find expected ',' or ']'"),
    ("a: 1\n---\nb: 2\n", "line 2 column 1: but found another document"),
    ("a: b\udcff", "line 1 column 5: bytes that are not UTF-8"),
    ("a: \x00", "line 1 column 4: character '\\x00' is not allowed in YAML"),
])
def test_yaml_refusals_name_line_and_column(text, message):
    with pytest.raises(ValueError) as caught:
        configs.loads(text, "yaml")
    assert str(caught.value).startswith(message), str(caught.value)


def test_yaml_aliases_dates_and_merges():
    # Dates stay text; aliases and merge keys work; a document of aliases
    # that would expand past MAX_YAML_VALUES is refused, never expanded.
    assert configs.loads("d: 2024-01-01\nt: 2001-12-14t21:59:43.10-05:00", "yaml") == {
        "d": "2024-01-01", "t": "2001-12-14t21:59:43.10-05:00"}
    assert configs.loads("base: &b {port: 9000}\nkeys: [*b, *b]\nmore: {<<: *b, id: x}", "yaml") == {
        "base": {"port": 9000}, "keys": [{"port": 9000}, {"port": 9000}], "more": {"port": 9000, "id": "x"}}
    laughs = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(7))
    with pytest.raises(ValueError, match=r"expands through aliases to more than 1000000 values"):
        configs.loads(laughs, "yaml")
    assert configs.loads("", "yaml") is None


def test_the_pure_python_yaml_loader_reads_the_same():
    """Without libyaml, PyYAML's own loader is used: same values, same refusals."""
    loader = configs._yaml_loader(yaml.SafeLoader)
    text = "keys:\n  - {port: 9000, day: 2024-01-01}\nweb: &w {listen: ['127.0.0.1:8000']}\nalso: *w\n"
    original = configs._YamlLoader
    try:
        configs._YamlLoader = loader
        assert configs.loads(text, "yaml") == {"keys": [{"port": 9000, "day": "2024-01-01"}],
                                               "web": {"listen": ["127.0.0.1:8000"]},
                                               "also": {"listen": ["127.0.0.1:8000"]}}
        with pytest.raises(ValueError, match=r"line 1 column 4: 'tag:yaml.org,2002:binary'"):
            configs.loads("a: !!binary aGk=", "yaml")
        with pytest.raises(ValueError, match=r"^line"):
            configs.loads("[" * 5000, "yaml")
    finally:
        configs._YamlLoader = original
