"""
Beacon: an event when a shadowsocks server starts running short, once per
condition.

It reads the report of ``shadowsocks_tuning.diagnose`` (the execution
module, so the engines are the same and nothing is computed twice) every
``interval`` seconds, keeping its previous sample and the conditions already
announced in ``__context__``, and fires an event when:

- a watched daemon (shadowsocks processes, their plugins, supervisord) has
  less than ``headroom`` percent of its open-file limit left
  (tag ``salt/beacon/<id>/shadowsocks_tuning/fd-headroom``), or it gets
  worse (warning to critical);
- a kernel counter of the diagnosis rises: ``ListenOverflows``,
  ``ListenDrops``, ``TCPTimeWaitOverflow``, ``TCPMemoryPressures``,
  ``TCPAbortOnMemory``, the TCP Fast Open fallbacks, the Udp buffer errors
  (``.../counter``), once per run of rises;
- a sysctl this package applied drifts from the applied value (``.../drift``);
- system open files, TCP memory or the conntrack table run short
  (``.../file-nr``, ``.../tcp-mem``, ``.../conntrack``).

A condition that clears is forgotten, so it fires again if it comes back.
Each event carries the finding: process and pid, the numbers, the limit, the
pillar key and the fix.

.. code-block:: yaml

    beacons:
      shadowsocks_tuning:
        - interval: 10      # seconds between looks
        - headroom: 20      # percent of a daemon's open-file limit left
        - counters: true    # events on rising kernel counters
        - drift: true       # events on drifted managed sysctls
"""

__virtualname__ = "shadowsocks_tuning"

DIAGNOSE = "shadowsocks_tuning.diagnose"
# Keys of the beacon's own config; the others are Salt's.
OWN = {"headroom": 20, "counters": True, "drift": True}
SALT_KEYS = ("interval", "enabled", "beacon_module", "run_once", "disable_during_state_run", "_beacon_name")
# Finding condition prefix -> event tag.
TAGS = {"fds": "fd-headroom", "counter": "counter", "drift": "drift", "file-nr": "file-nr", "tcp-mem": "tcp-mem",
        "conntrack": "conntrack"}


def __virtual__():
    if DIAGNOSE not in __salt__:
        return (False, "shadowsocks_tuning beacon: the shadowsocks_tuning execution module is not available; "
                       "run saltutil.sync_all (file_roots) or install the package (pip)")
    return __virtualname__


def _as_dict(config):
    out = {}
    for item in config:
        out.update(item)
    return out


def validate(config):
    """A list of one-key mappings: ``headroom`` (percent, 1 to 99),
    ``counters`` and ``drift`` (true or false), and Salt's own ``interval``,
    ``enabled``, ``disable_during_state_run``."""
    if not isinstance(config, list) or not all(isinstance(item, dict) for item in config):
        return False, ("shadowsocks_tuning beacon: configuration must be a list of mappings, "
                       "e.g. [{interval: 10}, {headroom: 20}]")
    settings = _as_dict(config)
    unknown = sorted(str(k) for k in settings if k not in OWN and k not in SALT_KEYS)
    if unknown:
        return False, (f"shadowsocks_tuning beacon: unknown setting(s) {', '.join(unknown)} "
                       f"(known: {', '.join(OWN)}, interval)")
    headroom = settings.get("headroom", OWN["headroom"])
    if isinstance(headroom, bool) or not isinstance(headroom, (int, float)) or not 1 <= headroom <= 99:
        return False, f"shadowsocks_tuning beacon: headroom: {headroom!r} must be a percentage from 1 to 99"
    for key in ("counters", "drift"):
        if not isinstance(settings.get(key, True), bool):
            return False, f"shadowsocks_tuning beacon: {key}: {settings[key]!r} must be true or false"
    return True, "Valid beacon configuration"


def _kind(finding):
    return TAGS.get(finding["condition"].split(":", 1)[0], "other")


def changes(findings, announced, settings):
    """(events, conditions now active): an event for each condition that is
    new or got worse since ``announced`` ({condition: signature})."""
    events, active = [], {}
    for finding in findings:
        kind = _kind(finding)
        if kind == "counter":
            if not settings.get("counters", True) or not finding["evidence"].get("change"):
                continue
            signature = "rising"
        elif kind == "drift":
            if not settings.get("drift", True) or finding["severity"] == "ok":
                continue
            signature = finding["evidence"]["value"]
        elif finding["severity"] == "ok":
            continue
        else:
            signature = finding["severity"]
        active[finding["condition"]] = signature
        if announced.get(finding["condition"]) != signature:
            events.append(dict(finding, tag=kind))
    return events, active


def beacon(config):
    """One look: the events of conditions that appeared or got worse."""
    settings = _as_dict(config)
    memory = __context__.setdefault("shadowsocks_tuning", {"sample": None, "announced": {}})
    report = __salt__[DIAGNOSE](headroom=settings.get("headroom", OWN["headroom"]),
                                critical=min(5, settings.get("headroom", OWN["headroom"])),
                                previous=memory["sample"], save=False)
    memory["sample"] = report["sample"]
    events, memory["announced"] = changes(report["findings"], memory["announced"], settings)
    return events
