"""
Containers: the tuning written the way a container runtime applies it. A
container has its own network namespace, so only the per-namespace keys
can go in its definition (docker-compose ``sysctls:``, ``docker run
--sysctl``, a Kubernetes pod's ``securityContext.sysctls``); the runtime
writes them to ``/proc/sys`` inside the namespace when the container starts,
and refuses to start it when one fails. Global keys (``net.core.rmem_max``,
``fs.*``) belong to the host; the open-file limit becomes ``ulimits``.

Plain values in (resolved settings, the live values of the kernel the
command runs on, the congestion controls it offers), text and data out; no
Salt, no I/O.
"""

import json
import re
import shlex

from salt.exceptions import SaltInvocationError

from sstuning_catalogue import CATALOGUE, CONGESTION_KEY, RESERVED_PORTS_KEY
from sstuning_sysctl import choose_congestion, decide, describe

FORMATS = ("compose", "docker", "kubernetes")

# Kubernetes' safe sysctls (pkg/kubelet/sysctl/safe_sysctls.go, checked at
# kubernetes/kubernetes b0cb9cc; the release notes of each addition in
# docs/tasks/administer-cluster/sysctl-cluster.md): the release that made
# each one safe, None for the original set. Every other key is "unsafe": a
# pod that sets it is rejected unless the node's kubelet runs with
# --allowed-unsafe-sysctls naming it.
KUBERNETES_SAFE = {
    "kernel.shm_rmid_forced": None,
    "net.ipv4.ip_local_port_range": None,
    "net.ipv4.tcp_syncookies": None,
    "net.ipv4.ping_group_range": "1.18",
    "net.ipv4.ip_unprivileged_port_start": "1.22",
    "net.ipv4.ip_local_reserved_ports": "1.27",
    "net.ipv4.tcp_keepalive_time": "1.29",
    "net.ipv4.tcp_keepalive_intvl": "1.29",
    "net.ipv4.tcp_keepalive_probes": "1.29",
    "net.ipv4.tcp_fin_timeout": "1.29",
    "net.ipv4.tcp_rmem": "1.32",
    "net.ipv4.tcp_wmem": "1.32",
}

# The open-file limit a container gets when its definition says nothing:
# docker >= 25 and containerd >= 2 give 1024:524288 (systemd's default);
# older docker gave 1048576:1048576 (dockerd's own LimitNOFILE=infinity).
RUNTIME_NOFILE = (1024, 524288)

_SERVICE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}\Z")  # a compose service name
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_.-]+\Z")


def validate_format(fmt):
    if fmt not in FORMATS:
        raise SaltInvocationError(f"format: {fmt!r} must be one of {', '.join(FORMATS)}")
    return fmt


def validate_service(name):
    if not isinstance(name, str) or not _SERVICE.match(name):
        raise SaltInvocationError(
            f"service: {name!r} is not a compose service name (lower-case letters, digits, '_', '.', '-'), "
            "e.g. shadowsocks"
        )
    return name


def scope(key):
    """``netns`` or ``global``: the catalogue's, else guessed from the name
    (``net.*`` outside ``net.core`` is per namespace on today's kernels)."""
    if key in CATALOGUE:
        return CATALOGUE[key]["scope"]
    return "netns" if key.startswith("net.") and not key.startswith("net.core.") else "global"


def plan(settings, live, available=(), allowed=(), config_ports=None):
    """Split the resolved sysctls into what the container sets, what the host
    sets and what needs no line, by the decisions ``apply`` makes
    (``sstuning_sysctl.decide``) against ``live`` (this kernel): never below
    what it has, a profile's documented lowering aside; a removed key wanted
    at 0 needs nothing. Container facts on top: a new network namespace
    inherits the host's congestion control, so keys that only ask for the
    kernel's default are left to it, and only a congestion control the host
    loaded and allows in namespaces can be set (the runtime refuses to start
    the container otherwise); it starts with no reserved ports, so those are
    pillar's and the configs' (``config_ports``, {port: where})."""
    container, host, left_out, notes = {}, {}, {}, []
    writable = {"status": "writable", "reason": "a container's own network namespace"}
    for key, text in settings["sysctls"].items():
        have = live.get(key)
        if key in settings.get("kernel_default", ()) and key not in settings["force"]:
            left_out[key] = (f"the profile asks only for the kernel default {text}: the container inherits the "
                             "host's; name it in pillar sysctls to set it")
            continue
        if have is None and key in CATALOGUE and scope(key) != "netns":
            # Global, and not visible from this network namespace: the host's to
            # set, where apply judges it against the host's value.
            host[key] = text
            notes.append(f"{key}: global and not visible here; the host keeps it if it already has more")
            continue
        probe = writable if have is not None or key not in CATALOGUE else {
            "status": "absent", "reason": "this kernel has no such key (removed)"}
        cc = choose_congestion(text, settings.get("congestion_fallback"), list(available), list(allowed), True) \
            if key == CONGESTION_KEY else None
        decision = decide(key, text, "" if key == RESERVED_PORTS_KEY else have, probe, settings, None, cc,
                          config_ports or {})
        action = decision["action"]
        if action == "satisfied":
            left_out[key] = f"wanted {text}, and this kernel has no such key (removed); a runtime refuses a missing key"
            continue
        if action in ("error", "restricted"):
            left_out[key] = f"{describe(decision)}: a container runtime would fail to start the container with it"
            continue
        if action == "kept":
            left_out[key] = f"{describe(decision)}; nothing to set"
            continue
        if action == "merged":
            if not decision["target"]:
                left_out[key] = "no shadowsocks port to reserve (pillar reserved_ports, the daemons' configs)"
                continue
            if config_ports:
                notes.append(f"{key}: reserves the ports of " + ", ".join(
                    f"{port} ({config_ports[port]})" for port in sorted(config_ports)))
        elif decision["why"] in ("partly-kept", "fallback"):
            notes.append(f"{key}: {describe(decision)}")
        if decision["target"] is None:
            left_out[key] = describe(decision)
            continue
        if key not in CATALOGUE:
            notes.append(f"{key}: not in this package's catalogue; {scope(key)} scope guessed from its name")
        (container if scope(key) == "netns" else host)[key] = decision["target"]
    return {"sysctls": container, "host_only": host, "left_out": left_out, "notes": notes}


def unsafe_in_kubernetes(keys):
    return sorted(key for key in keys if key not in KUBERNETES_SAFE)


def _q(text):
    """A YAML double-quoted scalar (JSON's string syntax is valid YAML)."""
    return json.dumps(str(text))


def _key(key):
    return key if _PLAIN_KEY.match(key) else _q(key)


def _host_comment(host):
    if not host:
        return []
    lines = ["# Host-only keys (global, not per network namespace): set them on the host itself,",
             "# e.g. with salt-call shadowsocks_tuning.apply there, never in the container:"]
    lines.extend(f"#   {key} = {value}" for key, value in host.items())
    return lines


def ulimits(nofile, raises_soft, runtime=RUNTIME_NOFILE):
    """(soft, hard) for the container's definition, or None when the
    runtime's default is already enough: raised per field, never below the
    runtime's default; for a daemon that raises its soft limit to its hard
    limit by itself, only the hard limit counts."""
    hard = max(nofile, runtime[1])
    if raises_soft:
        return None if runtime[1] >= nofile else (hard, hard)
    return (max(nofile, runtime[0]), hard)


def render(fmt, profile, sysctls, nofile, host_only, service="shadowsocks"):
    """The snippet to paste: a compose file (``docker compose -f compose.yaml
    -f this.yaml`` merges it into the service of that name), a ``docker run``
    command line, or the ``securityContext`` of a Kubernetes pod spec."""
    head = f"# shadowsocks tuning, profile {profile}: per-network-namespace sysctls and the open-file limit"
    if fmt == "compose":
        lines = [head, "services:", f"  {service}:"]
        if sysctls:
            lines.append("    sysctls:")
            lines.extend(f"      {_key(key)}: {_q(value)}" for key, value in sysctls.items())
        if nofile:
            lines += ["    ulimits:", "      nofile:", f"        soft: {nofile[0]}", f"        hard: {nofile[1]}"]
        return "\n".join(lines + _host_comment(host_only)) + "\n"
    if fmt == "docker":
        args = [f"--sysctl {shlex.quote(f'{key}={value}')}" for key, value in sysctls.items()]
        if nofile:
            args.append(f"--ulimit nofile={nofile[0]}:{nofile[1]}")
        lines = _host_comment(host_only) + ["docker run \\"] + [f"  {arg} \\" for arg in args] + ["  IMAGE [COMMAND]"]
        return "\n".join(lines) + "\n"
    unsafe = unsafe_in_kubernetes(sysctls)
    lines = [head.replace(" and the open-file limit", ""),
             "# (spec.securityContext of a Pod; spec.template.spec of a Deployment)"]
    if unsafe:
        lines += ["# Keys marked unsafe are refused unless every node's kubelet allows them:",
                  f"#   kubelet --allowed-unsafe-sysctls={shlex.quote(','.join(unsafe))}"]
    if nofile:
        lines += [f"# Kubernetes has no per-pod open-file limit: the container runtime's applies; start the server "
                  f"with `ss-server -n {nofile[0]}` where its hard limit allows it."]
    lines += ["securityContext:", "  sysctls:"] if sysctls else ["securityContext: {}"]
    for key, value in sysctls.items():
        mark = "  # unsafe: kubelet --allowed-unsafe-sysctls" if key in unsafe else ""
        lines += [f"  - name: {_key(key)}{mark}", f"    value: {_q(value)}"]
    return "\n".join(lines + _host_comment(host_only)) + "\n"


def container(settings, fmt, live, available=(), allowed=(), config_ports=None, service="shadowsocks",
              kind=None):
    """Everything ``shadowsocks_tuning.container`` returns: ``{"format",
    "profile", "text", "sysctls", "nofile", "ulimits", "host_only",
    "unsafe_in_kubernetes", "left_out", "notes"}``. ``kind``: the kind of
    daemon the container runs (registry entry), for its open-file limit."""
    fmt = validate_format(fmt)
    service = validate_service(service)
    planned = plan(settings, live, available, allowed, config_ports)
    notes = list(planned["notes"])
    raises_soft = bool(kind and kind.get("raises_soft"))
    nofile = settings.get("nofile_asked", settings["nofile"])  # not capped at this box's ceiling
    limit = ulimits(nofile, raises_soft)
    if limit is None:
        notes.append(f"nofile {nofile}: no ulimits needed: {kind['name']} raises its soft limit to its "
                     f"hard limit by itself, and the runtime's default hard limit ({RUNTIME_NOFILE[1]}) is higher")
    else:
        notes.append(f"nofile {limit[0]}:{limit[1]}: at least {nofile}, and never below the runtime's "
                     f"default {RUNTIME_NOFILE[0]}:{RUNTIME_NOFILE[1]} (docker >= 25, containerd >= 2; older docker "
                     "gives 1048576:1048576: there leave ulimits out)")
    if fmt == "kubernetes":
        notes.append(f"nofile {nofile}: a pod spec cannot set it; the runtime's default applies "
                     "(containerd and docker: their service's LimitNOFILE, or dockerd --default-ulimit)")
    return {
        "format": fmt,
        "profile": settings["profile"],
        "text": render(fmt, settings["profile"], planned["sysctls"], limit, planned["host_only"], service),
        "sysctls": planned["sysctls"],
        "nofile": nofile,
        "ulimits": {"soft": limit[0], "hard": limit[1]} if limit else None,
        "host_only": planned["host_only"],
        "unsafe_in_kubernetes": unsafe_in_kubernetes(planned["sysctls"]),
        "left_out": planned["left_out"],
        "notes": notes,
    }
