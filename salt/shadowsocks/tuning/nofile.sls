# Open-file limits that reach the daemons. Sysctls alone do not stop
# `too many open files`: each daemon's own RLIMIT_NOFILE must be raised.
# Running daemons are raised in place (prlimit: no connection is cut), the
# files their service manager reads at the next start are written, and only
# a daemon that cannot be raised in place is stopped and started (never
# Debian's `restart`, which only stops supervisor).
#
# Data: pillar shadowsocks:tuning:nofile and :limits (pillar.example; every
# kind of daemon the package knows is in `salt-call shadowsocks_tuning.daemons`).
# The states share the run's one plan: a typo anywhere fails all of them,
# nothing written.

# Every kind of daemon (supervisor, shadowsocks-libev, shadowsocks-rust,
# outline-ss-server, xray, v2ray, sing-box, pillar's own), the init scripts
# and the units pillar names.
shadowsocks-tuning-nofile:
  shadowsocks_tuning.limits_applied: []

# Proof: /proc/<pid>/limits of every process of those kinds.
shadowsocks-tuning-nofile-verify:
  shadowsocks_tuning.nofile_reached: []
