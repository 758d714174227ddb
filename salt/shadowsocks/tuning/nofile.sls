# Open-file limits that reach the daemons. Sysctls alone do not stop
# `too many open files`: the daemon's own limit must be raised where its
# service manager reads it, and the daemon stopped and started again (never
# Debian's `restart`, which only stops supervisor).
#
# Data: pillar shadowsocks:tuning:nofile and :limits (pillar.example; the
# defaults are in `salt-call shadowsocks_tuning.settings`). Each state checks
# the whole pillar first: a typo anywhere fails all of them, nothing written.
# The states run in the order written (Salt's default state_auto_order).

# /etc/default/supervisor: `ulimit -n N` (sourced by its init script);
# /etc/supervisor/supervisord.conf: minfds=N; supervisor.service: a
# LimitNOFILE drop-in under systemd. Then stop, wait, start supervisor.
shadowsocks-tuning-nofile-supervisor:
  shadowsocks_tuning.limits_applied:
    - part: supervisor

# /etc/default/shadowsocks-libev: MAXFD=N (its init script runs
# `ulimit -n ${MAXFD}`); drop-ins for its units under systemd.
shadowsocks-tuning-nofile-shadowsocks-libev:
  shadowsocks_tuning.limits_applied:
    - part: shadowsocks_libev

# Init scripts named in pillar: `ulimit -n N` right after the LSB header.
shadowsocks-tuning-nofile-init-scripts:
  shadowsocks_tuning.limits_applied:
    - part: init_scripts

# More systemd units named in pillar: a LimitNOFILE drop-in each.
shadowsocks-tuning-nofile-units:
  shadowsocks_tuning.limits_applied:
    - part: units

# Proof: /proc/<pid>/limits of supervisord and every shadowsocks process.
shadowsocks-tuning-nofile-verify:
  shadowsocks_tuning.nofile_reached: []
