"""Shared fixtures: a real salt-call inside a fresh network namespace, and a
guard that fails any test which leaves the host's sysctls changed."""

import pathlib
import subprocess
import uuid

import attr
import pytest
import yaml
from saltfactories.cli.call import SaltCall

from support.common import REPO, read_in_netns

from sstuning_catalogue import CATALOGUE  # the flat engine files (pytest.ini puts _utils on sys.path)
from sstuning_daemons import KINDS

# Every key this package knows, plus the global ones a child network namespace
# can still reach on this kernel (fs.* is not namespaced at all).
GUARDED_KEYS = sorted(set(CATALOGUE) | {"fs.file-max", "fs.nr_open"})


def _host_values():
    values = {}
    for key in GUARDED_KEYS:
        path = pathlib.Path("/proc/sys", *key.split("."))
        try:
            values[key] = path.read_text().strip()
        except OSError:
            values[key] = None
    return values


@pytest.fixture(scope="session")
def stats_processes():
    """pytest-system-statistics is disabled in pytest.ini (it breaks on pytest 9);
    salt-factories only hands its daemons to it when this is not None."""
    return None


@pytest.fixture(autouse=True)
def host_sysctls_unchanged():
    """Fail a test that changed a host sysctl, after putting the value back."""
    before = _host_values()
    yield
    after = _host_values()
    changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    for key, (old, _) in changed.items():
        pathlib.Path("/proc/sys", *key.split(".")).write_text(old)
    assert not changed, f"test changed host sysctls (restored now): {changed}"


@pytest.fixture
def netns():
    """A fresh, named network namespace, removed afterwards."""
    name = f"sst-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@attr.s(kw_only=True, slots=True)
class SaltCallInNetns(SaltCall):
    """salt-call run through `ip netns exec`, so every kernel write lands in
    the test's own network namespace."""

    netns = attr.ib(default=None)
    wrap = attr.ib(factory=list)  # argv run around it, e.g. a private mount namespace

    def cmdline(self, *args, **kwargs):
        cmd = super().cmdline(*args, **kwargs)
        return [*self.wrap, *(["ip", "netns", "exec", self.netns] if self.netns else []), *cmd]


class Masterless:
    """A masterless minion (real salt-call --local) with file_roots on this
    repository's salt/ tree, its own pillar, state dir and sysctl.d dirs."""

    def __init__(self, factory, netns, root, wrap=()):
        self.factory = factory
        self.netns = netns
        self.root = root
        self.cli = factory.salt_call_cli(factory_class=SaltCallInNetns, netns=netns, wrap=list(wrap), timeout=120)
        self.synced = False

    @property
    def config(self):
        return self.root / "sysctl.d" / "local.conf"

    def pillar(self, tuning):
        """Write pillar shadowsocks:tuning for this minion. Unless the test says
        otherwise, the open-file part stays off the host's real files and
        services: every kind of daemon is off, but those the test names."""
        limits = tuning.get("limits", {})
        if isinstance(limits, dict):
            tuning = {**tuning, "limits": {**{kind: None for kind in KINDS}, **limits}}
        (self.root / "pillar" / "shadowsocks.sls").write_text(yaml.safe_dump({"shadowsocks": {"tuning": tuning}}))

    def run(self, *args, **kwargs):
        if not self.synced:
            result = self.cli.run("--local", "saltutil.sync_all")
            assert result.returncode == 0, result.stderr
            self.synced = True
        return self.cli.run("--local", *args, **kwargs)

    def read(self, key):
        return " ".join(read_in_netns(self.netns, key))


@pytest.fixture
def make_masterless(salt_factories, netns, tmp_path):
    """Build masterless minions in the test's network namespace; keyword
    arguments are extra minion options (e.g. shadowsocks_tuning.proc_root)."""
    made = []

    def make(wrap=(), **extra):
        root = tmp_path / f"minion{len(made)}"
        for sub in ("pillar", "sysctl.d", "usr-lib-sysctl.d", "state", "modules-load.d"):
            (root / sub).mkdir(parents=True)
        (root / "pillar" / "top.sls").write_text("base:\n  '*':\n    - shadowsocks\n")
        overrides = {
            "file_client": "local",
            "file_roots": {"base": [str(REPO / "salt")]},
            "pillar_roots": {"base": [str(root / "pillar")]},
            "shadowsocks_tuning.state_dir": str(root / "state"),
            "shadowsocks_tuning.sysctl_dirs": [str(root / "sysctl.d"), str(root / "usr-lib-sysctl.d")],
            "shadowsocks_tuning.sysctl_conf": str(root / "sysctl.conf"),
            "shadowsocks_tuning.modules_load_dir": str(root / "modules-load.d"),
        }
        overrides.update(extra)
        factory = salt_factories.salt_minion_daemon(f"ml{len(made)}-{netns}", overrides=overrides)
        minion = Masterless(factory, netns, root, wrap)
        minion.pillar({"config": str(minion.config)})
        made.append(minion)
        return minion

    return make


@pytest.fixture
def masterless(make_masterless):
    return make_masterless()


def state_ret(result):
    """The single state return of a state.apply / state.single run."""
    assert isinstance(result.data, dict), f"no JSON state output: {result.stdout}\n{result.stderr}"
    return result.data
