# Undo shadowsocks.tuning: live sysctls put back to the values found before the
# first change, managed files restored byte for byte (or removed if created).
shadowsocks-tuning-clean:
  shadowsocks_tuning.cleaned: []
