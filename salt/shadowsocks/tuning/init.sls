# `state.apply shadowsocks.tuning`: kernel sysctls, then open-file limits.
include:
  - shadowsocks.tuning.sysctl
  - shadowsocks.tuning.nofile
