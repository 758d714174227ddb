"""Self-check for ssrig: a real ss-server data path on loopback, bounded to seconds.

Run:  python tests/support/ssrig_demo.py
1. ss-server under a private supervisord at `ulimit -n 1024`, 2000 requested
   connections: expect ~500 held and many 'too many open files' lines.
2. `ulimit -n 16384`, 4000 requested: expect all held and zero fd errors.
3. The clear-error paths (missing binary, port taken, daemon exits early,
   supervisord refusing a minfds above its hard limit).
"""
import json
import os
import socket
import sys
import time

sys.dont_write_bytecode = True  # leave no __pycache__ behind
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ssrig  # noqa: E402


def run_case(label, nofile, count, **ramp_kwargs):
    t0 = time.monotonic()
    with ssrig.loopback_rig(nofile=nofile) as rig:
        limits = rig.ss.nofile_limits()
        result = rig.ramp(count, **ramp_kwargs)
    result["case"] = label
    result["wall_seconds"] = round(time.monotonic() - t0, 2)
    print(f"--- {label}: ss-server limits {limits}")
    print(json.dumps(result, indent=1, sort_keys=True))
    return result


def error_checks():
    print("--- error paths")
    try:
        ssrig.require_binary("ss-nonexistent-binary", "shadowsocks-libev")
    except ssrig.MissingBinaryError as exc:
        print("MissingBinaryError:", exc)
    with socket.socket() as taken:
        taken.bind((ssrig.HOST, 0))
        taken.listen(1)
        try:
            ssrig.PrivateSupervisor(port=taken.getsockname()[1]).start()
        except ssrig.PortInUseError as exc:
            print("PortInUseError:", exc)
    try:  # unknown cipher: ss-server exits at once
        with ssrig.PrivateSupervisor(method="no-such-cipher", startup_timeout=5):
            pass
    except ssrig.DaemonExitedError as exc:
        print("DaemonExitedError (bad cipher):", str(exc)[:900])
    try:  # minfds above the hard limit: supervisord refuses to start
        with ssrig.PrivateSupervisor(nofile=1024, minfds=16384, startup_timeout=5):
            pass
    except ssrig.DaemonExitedError as exc:
        print("DaemonExitedError (minfds):", str(exc)[:900])


def main():
    t0 = time.monotonic()
    low = run_case("ulimit -n 1024", 1024, 2000, timeout=8, stall_timeout=2)
    high = run_case("ulimit -n 16384", 16384, 4000, timeout=20, stall_timeout=3)
    error_checks()
    ok = (300 <= low["held"] < 1000 and low["too_many_open_files"] > 0
          and high["held"] == 4000 and high["too_many_open_files"] == 0)
    print(f"--- demo {'OK' if ok else 'UNEXPECTED'} in {time.monotonic() - t0:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
