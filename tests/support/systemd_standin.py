#!/usr/bin/python3 -I
"""Stand-in launchers for servers Debian 12 does not package, installed inside
a SystemdBox at the path the real server's unit runs (ExecStart=). Each one
reads the config file in the real server's own format, then exec()s a copy of
a REAL server binary that sits in /usr/lib/sstest-standin under the real
server's name: the process systemd records as MainPID is that binary, and its
comm (the basename of the executed file) is the real server's name.

  name run as          real binary exec'd           what this launcher does first
  ssservice, ssserver  ss-server (shadowsocks-libev) raise the soft open-files limit to the
  (shadowsocks-rust)                                hard one, as shadowsocks-rust does since
                                                    1.14.3 unless "nofile"/-n sets both to N;
                                                    read the JSON5 config (comments, trailing
                                                    commas) into ss-server's -s -p -k -m
  outline-ss-server    v2ray 4.34 (Go 1.19)         YAML keys -> v2ray shadowsocks inbounds
  xray                 v2ray 4.34                   drop xray's `run` verb (same JSON format)
  sing-box             v2ray 4.34                   sing-box shadowsocks inbounds -> v2ray's

The Go ones do not touch limits: the Go runtime (1.19+) of the exec'd v2ray
raises the soft limit to the hard one itself, as the real Go servers do.
Known differences from the real servers: one key per port (v2ray 4.34 and
ss-server take one password per listener); no 2022-* ciphers; outline's
READY=1 (Type=notify) is sent before the exec, i.e. before the port listens,
where the real server sends it after: wait for the port, not for the unit.
Only the standard library and PyYAML (python3-yaml) are used.
"""

import json
import os
import resource
import socket
import sys

REAL_DIR = "/usr/lib/sstest-standin"


def die(message):
    sys.stderr.write("%s (stand-in): %s\n" % (os.path.basename(sys.argv[0]), message))
    sys.exit(2)


def _scan(text, drop):
    """Copy text, letting drop(text, i) skip a span outside strings: it
    returns the index to resume at, or None to keep the character."""
    out, i, n, in_str = [], 0, len(text), False
    while i < n:
        c = text[i]
        if in_str:
            if c == "\\" and i + 1 < n:
                out.append(text[i:i + 2])
                i += 2
                continue
            in_str = c != '"'
        elif c == '"':
            in_str = True
        else:
            resume = drop(text, i)
            if resume is not None:
                i = resume
                continue
        out.append(c)
        i += 1
    return "".join(out)


def _comment(text, i):
    if text.startswith("//", i):
        end = text.find("\n", i)
        return len(text) if end < 0 else end
    if text.startswith("/*", i):
        end = text.find("*/", i + 2)
        return len(text) if end < 0 else end + 2
    return None


def _trailing_comma(text, i):
    if text[i] != ",":
        return None
    rest = text[i + 1:].lstrip()
    return i + 1 if rest[:1] in ("}", "]") else None


def json5_loads(text, where):
    """JSON5 as shadowsocks-rust configs use it: // and /* */ comments and
    trailing commas, dropped outside strings; then plain JSON."""
    try:
        return json.loads(_scan(_scan(text, _comment), _trailing_comma))
    except ValueError as exc:
        die("%s: not JSON5: %s" % (where, exc))


def option(argv, *names):
    for k, arg in enumerate(argv):
        for name in names:
            if arg == name and k + 1 < len(argv):
                return argv[k + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError as exc:
        die("cannot read config %s: %s" % (path, exc))


def exec_real(name, args, stdin_text=None):
    real = os.path.join(REAL_DIR, name)
    if stdin_text is not None:
        r, w = os.pipe()
        os.write(w, stdin_text.encode())  # a few hundred bytes: fits the pipe
        os.close(w)
        os.dup2(r, 0)
        os.close(r)
    os.execv(real, [name, *args])


# ---------------------------------------------------------------- shadowsocks-rust
def shadowsocks_rust(name, argv):
    path = option(argv, "-c", "--config")
    if path is None:
        die("no -c CONFIG (the Debian units always pass one)")
    conf = json5_loads(read(path), path)
    server = conf
    if "server_port" not in conf:
        servers = conf.get("servers") or []
        if not servers:
            die("%s: neither server_port nor servers[] (a local/manager config?)" % path)
        server = servers[0]
    for key in ("server_port", "password", "method"):
        if key not in server:
            die("%s: key %r missing" % (path, key))
    if str(server["method"]).startswith("2022-"):
        die("%s: method %s: ss-server (the stand-in) has no 2022 ciphers" % (path, server["method"]))
    # shadowsocks-rust: -n N / "nofile": N set soft = hard = N; otherwise
    # adjust_nofile() raises the soft limit to the hard one.
    nofile = option(argv, "-n", "--nofile") or conf.get("nofile")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (int(nofile), int(nofile)))
        elif soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError) as exc:
        sys.stderr.write("set_nofile %s failed, error: %s\n" % (nofile, exc))  # the real one warns and goes on
    args = ["-s", str(server.get("server", "0.0.0.0")), "-p", str(server["server_port"]),
            "-k", str(server["password"]), "-m", str(server["method"])]
    if server.get("mode", conf.get("mode", "tcp_only")) in ("tcp_and_udp", "udp_only"):
        args.append("-u")
    exec_real(name, args)


# ---------------------------------------------------------------- Go servers (v2ray underneath)
def v2ray_config(inbounds):
    return json.dumps({
        "log": {"loglevel": "warning"},
        "inbounds": [{"listen": listen, "port": int(port), "protocol": "shadowsocks",
                      "settings": {"method": method, "password": password, "network": "tcp,udp"}}
                     for listen, port, method, password in inbounds],
        "outbounds": [{"protocol": "freedom", "settings": {}}],
    })


def outline(name, argv):
    import yaml  # python3-yaml; outline's config is YAML

    path = option(argv, "-config", "--config")
    if not path:
        # theraphim's packaged build: the unit's ConfigurationDirectory=
        directory = os.environ.get("CONFIGURATION_DIRECTORY")
        path = os.path.join(directory, "config.yml") if directory else "/etc/outline-ss-server/config.yml"
    try:
        conf = yaml.safe_load(read(path)) or {}
    except yaml.YAMLError as exc:
        die("%s: not YAML: %s" % (path, exc))
    keys = conf.get("keys")
    if not keys:
        die("%s: no keys: [{id, port, cipher, secret}] (the stand-in does not read services:)" % path)
    by_port = {}
    for key in keys:
        by_port.setdefault(int(key["port"]), key)  # one key per port (see the docstring)
    inbounds = [("::", port, k["cipher"], k["secret"]) for port, k in sorted(by_port.items())]
    notify = os.environ.get("NOTIFY_SOCKET")
    if notify:  # Type=notify: the real server sends READY=1 once it listens
        address = "\0" + notify[1:] if notify.startswith("@") else notify
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"READY=1", address)
    exec_real(name, ["-config", "stdin:"], v2ray_config(inbounds))


def xray(name, argv):
    path = option(argv, "-config", "-c", "--config")
    if not path:
        die("no -config FILE")
    exec_real(name, ["-config", path])  # v2ray 4.34 reads xray's JSON for a shadowsocks inbound


def sing_box(name, argv):
    files = []
    directory = option(argv, "-C", "--config-directory")
    if directory:
        files = sorted(os.path.join(directory, f) for f in os.listdir(directory) if f.endswith(".json"))
    single = option(argv, "-c", "--config")
    if single:
        files.append(single)
    inbounds = []
    for path in files:
        for inbound in json.loads(read(path)).get("inbounds", []):
            if inbound.get("type") == "shadowsocks":
                inbounds.append((inbound.get("listen", "::"), inbound["listen_port"],
                                 inbound["method"], inbound["password"]))
    if not inbounds:
        die("no shadowsocks inbound in %s" % files)
    exec_real(name, ["-config", "stdin:"], v2ray_config(inbounds))


LAUNCHERS = {"ssservice": shadowsocks_rust, "ssserver": shadowsocks_rust,
             "outline-ss-server": outline, "xray": xray, "sing-box": sing_box}


if __name__ == "__main__":
    NAME = os.path.basename(sys.argv[0])
    if NAME not in LAUNCHERS:
        die("run as one of %s, not %s" % (sorted(LAUNCHERS), NAME))
    LAUNCHERS[NAME](NAME, sys.argv[1:])
