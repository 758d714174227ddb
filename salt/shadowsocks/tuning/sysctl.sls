# Kernel tuning: profile, overrides and policies all come from pillar
# shadowsocks:tuning (see pillar.example); the state reads them itself.
shadowsocks-tuning-sysctl:
  shadowsocks_tuning.tuned: []
