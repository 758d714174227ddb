"""Unit files, defaults files and configs, as data, in the exact shape each
server's own packaging ships them; and `install()`, which puts one shape into a
SystemdBox. Each block names where its text comes from. Debian 12's own
packages (shadowsocks-libev, supervisor, v2ray) are not copied here: their
installed files are the host's, visible inside a host-mode box as they are;
`DEBIAN_UNITS` lists what the fixtures expect those files to say, so a changed
package is noticed instead of silently testing something else.

Also here, the two ways tests talk to what runs in a box: a shadowsocks round
trip through a server (`shadowsocks_roundtrip`) and salt-call --local against
the box's systemd (`SaltInBox`).

Ports: each shape's config keeps its packaging's layout, with a port of its own
(the packagings' defaults collide: shadowsocks-libev and shadowsocks-rust both
ship 8388) so all of them can run in one box at once.
"""

import json
import os
import shlex
import sys

STANDIN_DIR = "/usr/lib/sstest-standin"  # copies of real binaries (see systemd_standin.py)
STANDIN_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "systemd_standin.py")
PASSWORD = "sstest-loopback-password"
METHOD = "chacha20-ietf-poly1305"

# Debian 12 packages, as installed: unit -> lines the unit file must contain.
DEBIAN_UNITS = {
    # shadowsocks-libev 3.3.5+ds-10: /lib/systemd/system/
    "shadowsocks-libev.service": ("DynamicUser=true", "EnvironmentFile=/etc/default/shadowsocks-libev",
                                  "LimitNOFILE=32768", "ExecStart=/usr/bin/ss-server -c $CONFFILE $DAEMON_ARGS"),
    "shadowsocks-libev-server@.service": ("DynamicUser=true",
                                          "ExecStart=/usr/bin/ss-server -c /etc/shadowsocks-libev/%i.json"),
    # supervisor 4.2.5-1
    "supervisor.service": ("ExecStart=/usr/bin/supervisord -n -c /etc/supervisor/supervisord.conf",
                           "KillMode=process"),
    # v2ray 4.34.0+ds-1: no LimitNOFILE (Go raises soft to hard by itself)
    "v2ray.service": ("DynamicUser=true", "ExecStart=/usr/bin/v2ray -config /etc/v2ray/config.json"),
}

# /etc/v2ray/config.json: Debian's file (postinst: a vmess inbound on 10086,
# from /usr/share/v2ray/config_vmess.json) with the inbound switched to
# shadowsocks, as a user serving shadowsocks with v2ray writes it.
V2RAY_PORT = 8488
V2RAY_CONFIG = """{
  "inbounds": [{
    "port": %d,
    "listen": "127.0.0.1",
    "protocol": "shadowsocks",
    "settings": {
      "method": "%s",
      "password": "%s",
      "network": "tcp,udp"
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
""" % (V2RAY_PORT, METHOD, PASSWORD)

# A program under Debian's supervisor: ss-server, as the "Optimizing
# Shadowsocks" recipe runs it (/etc/supervisor/conf.d/*.conf is included by
# Debian's supervisord.conf).
SUPERVISOR_PORT = 8390
SUPERVISOR_PROGRAM = """[program:shadowsocks]
command=/usr/bin/ss-server -s 127.0.0.1 -p %d -k %s -m %s
autorestart=true
""" % (SUPERVISOR_PORT, PASSWORD, METHOD)

# ------------------------------------------------------------------ shadowsocks-rust
# github.com/shadowsocks/shadowsocks-rust, debian/ at master 6b96a84 (v1.25.0):
# shadowsocks-rust.default, shadowsocks-rust.service, shadowsocks-rust-server@.service,
# config.json (postinst replaces "barfoo" with `ssservice genkey`).
SSRUST_PORT = 8389
SSRUST_INSTANCE_PORT = 8391
SHADOWSOCKS_RUST = {
    "/etc/default/shadowsocks-rust": """# Defaults for shadowsocks initscript
# sourced by /etc/init.d/shadowsocks-rust
# installed at /etc/default/shadowsocks-rust by the maintainer scripts

#
# This is a POSIX shell fragment
#
# Note: `START', `GROUP' and `MAXFD' options are not recognized by systemd.
# Please change those settings in the corresponding systemd unit file.

# Enable during startup?
START=yes

# Configuration file
CONFFILE="/etc/shadowsocks-rust/config.json"

# Extra command line arguments
DAEMON_ARGS="--log-without-time"

# User and group to run the server as
USER=nobody
GROUP=nogroup

# Number of maximum file descriptors
MAXFD=32768
""",
    "/lib/systemd/system/shadowsocks-rust.service": """#  This file is part of shadowsocks-rust.
#
#  This file is default for Debian packaging. See also
#  /etc/default/shadowsocks-rust for environment variables.

[Unit]
Description=Shadowsocks-rust Default Server Service
Documentation=https://github.com/shadowsocks/shadowsocks-rust
After=network.target

[Service]
Type=simple
EnvironmentFile=/etc/default/shadowsocks-rust
DynamicUser=yes
LimitNOFILE=32768
ExecStart=/usr/bin/ssservice server -c ${CONFFILE} ${DAEMON_ARGS}

[Install]
WantedBy=multi-user.target
""",
    "/lib/systemd/system/shadowsocks-rust-server@.service": """#  This file is part of shadowsocks-rust.
#
#  This is a template unit file. Users may copy and rename the file into
#  config directories to make new service instances. See systemd.unit(5)
#  for details.

[Unit]
Description=Shadowsocks-rust Custom Server Service for %I
Documentation=https://github.com/shadowsocks/shadowsocks-rust
After=network.target

[Service]
Type=simple
CapabilityBoundingSet=CAP_NET_BIND_SERVICE
AmbientCapabilities=CAP_NET_BIND_SERVICE
DynamicUser=yes
ExecStart=/usr/bin/ssservice server --log-without-time -c /etc/shadowsocks-rust/%i.json

[Install]
WantedBy=multi-user.target
""",
    "/etc/shadowsocks-rust/config.json": """{
    "server": "0.0.0.0",
    "server_port": %d,
    "local_address": "127.0.0.1",
    "local_port": 1080,
    "password": "%s",
    "timeout": 300,
    "method": "%s"
}
""" % (SSRUST_PORT, PASSWORD, METHOD),
    # An instance config as users write them: JSON5 (comments, trailing comma)
    # and the multi-server layout (servers: [...]).
    "/etc/shadowsocks-rust/extra.json": """{
    // the template unit runs: ssservice server -c /etc/shadowsocks-rust/%%i.json
    "servers": [
        {
            "server": "127.0.0.1",
            "server_port": %d,
            "password": "%s",
            "method": "%s", /* one of the AEAD ciphers */
        },
    ],
}
""" % (SSRUST_INSTANCE_PORT, PASSWORD, METHOD),
}
SHADOWSOCKS_RUST_STANDINS = {"/usr/bin/ssservice": "/usr/bin/ss-server"}

# ------------------------------------------------------------------ outline-ss-server
# Jigsaw-Code/outline-ss-server ships no unit or package (goreleaser tarballs;
# the Outline server runs it in Docker). The one packaging with a systemd unit
# found is the RPM of github.com/theraphim/outline-ss-server (outline-ss-server.spec:
# unit, /etc/sysconfig/outline-ss-server, and the upstream example config as
# /etc/outline-ss-server/config.yml); this is its unit at commit c25ca9e, before
# socket activation. The config is upstream's keys: layout
# (cmd/outline-ss-server/config_example.deprecated.yml, as config_example.yml was then).
OUTLINE_PORT = 9000
OUTLINE = {
    "/usr/lib/systemd/system/outline-ss-server.service": """[Unit]
Description=Outline server
After=local-fs.target network.target

[Service]
Type=notify
EnvironmentFile=-/etc/sysconfig/outline-ss-server
ExecStart=/usr/bin/outline-ss-server -metrics=${OUTLINE_METRICS_ADDR} -replay_history=${OUTLINE_REPLAY_HISTORY}
ConfigurationDirectory=outline-ss-server
User=outline-ss-server
Group=outline-ss-server
DynamicUser=yes
Restart=on-failure
LimitNOFILE=655360
ExecReload=kill -HUP $MAINPID

[Install]
WantedBy=multi-user.target
""",
    "/etc/sysconfig/outline-ss-server": """#OUTLINE_IP_COUNTRY_DB=""
#OUTLINE_METRICS_ADDR=""
OUTLINE_REPLAY_HISTORY=10000
""",
    "/etc/outline-ss-server/config.yml": """keys:
  - id: user-0
    port: %d
    cipher: %s
    secret: Secret0

  - id: user-1
    port: %d
    cipher: %s
    secret: Secret1
""" % (OUTLINE_PORT, METHOD, OUTLINE_PORT, METHOD),
}
OUTLINE_STANDINS = {"/usr/bin/outline-ss-server": "/usr/bin/v2ray"}

# ------------------------------------------------------------------ xray (LimitNOFILE=1000000)
# github.com/XTLS/Xray-install, install-release.sh at e741a4f: xray.service
# (INSTALL_USER=nobody: the capability lines stay in) and the drop-in
# 10-donot_touch_single_conf.conf it writes next to it.
XRAY_PORT = 8492
XRAY = {
    "/etc/systemd/system/xray.service": """[Unit]
Description=Xray Service
Documentation=https://github.com/xtls
After=network.target nss-lookup.target

[Service]
User=nobody
CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_BIND_SERVICE
AmbientCapabilities=CAP_NET_ADMIN CAP_NET_BIND_SERVICE
NoNewPrivileges=true
ExecStart=/usr/local/bin/xray run -config /usr/local/etc/xray/config.json
Restart=on-failure
RestartPreventExitStatus=23
LimitNPROC=10000
LimitNOFILE=1000000
RuntimeDirectory=xray
RuntimeDirectoryMode=0755

[Install]
WantedBy=multi-user.target
""",
    "/etc/systemd/system/xray.service.d/10-donot_touch_single_conf.conf": """# In case you have a good reason to do so, duplicate this file in the same directory and make your customizes there.
# Or all changes you made will be lost!  # Refer: https://www.freedesktop.org/software/systemd/man/systemd.unit.html
[Service]
ExecStart=
ExecStart=/usr/local/bin/xray run -config /usr/local/etc/xray/config.json
""",
    "/usr/local/etc/xray/config.json": """{
  "inbounds": [{
    "listen": "127.0.0.1",
    "port": %d,
    "protocol": "shadowsocks",
    "settings": {"method": "%s", "password": "%s", "network": "tcp,udp"}
  }],
  "outbounds": [{"protocol": "freedom"}]
}
""" % (XRAY_PORT, METHOD, PASSWORD),
}
XRAY_STANDINS = {"/usr/local/bin/xray": "/usr/bin/v2ray"}

# ------------------------------------------------------------------ sing-box (LimitNOFILE=infinity)
# github.com/SagerNet/sing-box, release/config/ at 7df171f: sing-box.service,
# sing-box.sysusers (its postinst runs `systemd-sysusers sing-box.conf`), and
# config.json's shadowsocks inbound (a 2022 cipher there; an AEAD one here,
# which the stand-in can serve).
SINGBOX_PORT = 8493
SINGBOX = {
    "/usr/lib/systemd/system/sing-box.service": """[Unit]
Description=sing-box service
Documentation=https://sing-box.sagernet.org
After=network.target nss-lookup.target network-online.target

[Service]
User=sing-box
StateDirectory=sing-box
CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW CAP_NET_BIND_SERVICE CAP_SYS_PTRACE CAP_DAC_READ_SEARCH
AmbientCapabilities=CAP_NET_ADMIN CAP_NET_RAW CAP_NET_BIND_SERVICE CAP_SYS_PTRACE CAP_DAC_READ_SEARCH
ExecStart=/usr/bin/sing-box -D /var/lib/sing-box -C /etc/sing-box run
ExecReload=/bin/kill -HUP $MAINPID
Restart=on-failure
RestartSec=10s
LimitNOFILE=infinity

[Install]
WantedBy=multi-user.target
""",
    "/usr/lib/sysusers.d/sing-box.conf": 'u sing-box - "sing-box Service"\n',
    "/etc/sing-box/config.json": """{
  "log": {"level": "info"},
  "inbounds": [
    {
      "type": "shadowsocks",
      "listen": "127.0.0.1",
      "listen_port": %d,
      "network": "tcp",
      "method": "%s",
      "password": "%s"
    }
  ],
  "outbounds": [{"type": "direct"}]
}
""" % (SINGBOX_PORT, METHOD, PASSWORD),
}
SINGBOX_STANDINS = {"/usr/bin/sing-box": "/usr/bin/v2ray"}
SINGBOX_AFTER_INSTALL = (("systemd-sysusers", "sing-box.conf"),)  # its postinst

def check_debian_unit(box, unit):
    """Fail loudly if the unit file the Debian package installed no longer
    has the expected lines (read from the file: `systemctl cat` of a unit
    the box masked shows only that it is masked)."""
    text = box.read("/lib/systemd/system/" + unit)
    missing = [line for line in DEBIAN_UNITS[unit] if line not in text.splitlines()]
    if missing:
        raise AssertionError("the installed %s lacks %s: the package changed; update "
                             "tests/support/systemd_units.py DEBIAN_UNITS\n%s" % (unit, missing, text))
    return text


def install_standins(box, standins):
    """Put the launcher at each ExecStart path and a copy of the real binary
    under the same basename in STANDIN_DIR (a copy, not a symlink, so that
    /proc/PID/exe names it too)."""
    with open(STANDIN_SOURCE) as f:
        launcher = f.read()
    for path, real in standins.items():
        copy = os.path.join(STANDIN_DIR, os.path.basename(path))
        box.run(["sh", "-c", "mkdir -p %s && cp %s %s" % (shlex.quote(STANDIN_DIR), shlex.quote(real),
                                                          shlex.quote(copy))], check=True)
        box.write(path, launcher, mode=0o755)


def install(box, files, standins=None, after=()):
    """Write a shape's files inside the box, its stand-ins, run its
    postinst-like commands, then daemon-reload."""
    for path, text in files.items():
        box.write(path, text)
    if standins:
        install_standins(box, standins)
    for argv in after:
        box.run(list(argv), check=True)
    box.daemon_reload()


def dropin(box, unit, text, name="nofile.conf"):
    """Write /etc/systemd/system/UNIT.d/NAME (no reload)."""
    path = "/etc/systemd/system/%s.d/%s" % (unit, name)
    box.write(path, text)
    return path


def limit_dropin(nofile):
    return "[Service]\nLimitNOFILE=%s\n" % nofile


def systemctl_edit(box, unit, text):
    """`systemctl edit UNIT` as an admin does it: systemctl makes the
    override.conf itself. It insists on a terminal, so it runs under
    script(1); the "editor" copies `text` over the temporary file."""
    src = "/run/sstest-edit-%s.conf" % unit.replace("@", "_")
    box.write(src, text)
    box.run(["script", "-qec", "SYSTEMD_EDITOR='cp %s' systemctl edit %s" % (src, shlex.quote(unit)),
             "/dev/null"], check=True)
    box.remove(src)
    return "/etc/systemd/system/%s.d/override.conf" % unit


# ------------------------------------------------------------------ talking to servers in a box
_ROUNDTRIP = """
import json, sys
sys.path.insert(0, sys.argv[1])
from support.ssrig import EchoServer, SsLocal, socks5_ramp
port, password, method, count = int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
with EchoServer() as echo, SsLocal(port, password=password, method=method) as local:
    result = socks5_ramp(local.port, echo.port, count, timeout=20, hold_seconds=0.1)
print(json.dumps({k: result[k] for k in ("requested", "held", "failures")}))
"""


def shadowsocks_roundtrip(box, port, password=PASSWORD, method=METHOD, count=3):
    """`count` SOCKS5 connections through a real ss-local to the shadowsocks
    server on 127.0.0.1:port inside the box, each echoed back by an echo
    server there (tests/support/ssrig, run inside with this interpreter).
    Returns {"requested", "held", "failures"}."""
    tests_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = box.run([sys.executable, "-I", "-c", _ROUNDTRIP, tests_dir, port, password, method, count],
                  check=True, timeout=60).stdout
    return json.loads(out.strip().splitlines()[-1])


class SaltInBox:
    """salt-call --local inside a box, from this test run's own venv (visible
    in host mode: the lower layer is the host's /), with a minion config
    written inside: file_roots on this repository's salt/, pillar_roots on
    `pillar_dir` (a host dir bound into the box: its /tmp is its own)."""

    CONFIG_DIR = "/etc/sstest-salt"

    def __init__(self, box, repo, pillar_dir, venv=sys.prefix):
        self.box = box
        self.salt_call = os.path.join(venv, "bin", "salt-call")
        if not os.path.exists(self.salt_call):
            raise FileNotFoundError("%s: the test venv has no salt-call (pip install -r requirements-test.txt)"
                                    % self.salt_call)
        box.write(self.CONFIG_DIR + "/minion", json.dumps({
            "id": "sstest-box",
            "file_client": "local",
            "file_roots": {"base": [os.path.join(str(repo), "salt")]},
            "pillar_roots": {"base": [str(pillar_dir)]},
            "pki_dir": self.CONFIG_DIR + "/pki",
            "cachedir": "/var/cache/sstest-salt",
            "log_file": "/var/log/sstest-salt/minion",
            # No network inside: the fqdns grain would wait for reverse DNS
            # (3 s of every call); grains do not change while a box is up.
            "enable_fqdns_grains": False,
            "grains_cache": True,
        }, indent=2) + "\n")  # JSON is YAML

    def __call__(self, *args, timeout=180):
        """Run salt-call --local ARGS --out=json; returns (data, CompletedProcess)."""
        proc = self.box.run([self.salt_call, "--local", "-c", self.CONFIG_DIR, "--out=json",
                             "--log-level=quiet", *args], timeout=timeout)
        try:
            data = json.loads(proc.stdout)["local"]
        except (ValueError, KeyError):
            data = None
        return data, proc
