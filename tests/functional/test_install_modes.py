"""The three ways the package reaches a minion, each through real Salt:
installed by pip (the Salt loader finds it through its entry point, no
file_roots), shipped by file_roots and `saltutil.sync_all` (modules, states
and the `_utils` engines land in extmods), and a re-sync into a minion daemon
that keeps running (the execution module must not keep a stale engine).
salt-ssh, the fourth, is tests/integration/test_salt_ssh.py."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import time
import uuid

import pytest

from support.common import REPO, read_in_netns

ENGINES = sorted(p.stem for p in (REPO / "_utils").glob("sstuning_*.py"))


def salt_call(config, *args, env=None, netns=None, cwd=None):
    argv = [sys.executable, "-c", "import salt.scripts; salt.scripts.salt_call()", "-c", str(config),
            "--local", "--out=json", *args]
    if netns:
        argv = ["ip", "netns", "exec", netns, *argv]
    return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=cwd)


# --------------------------------------------------------------------------
# pip
# --------------------------------------------------------------------------
def test_pip_install_registers_the_modules_with_the_salt_loader(tmp_path, netns):
    # Build from a copy: setuptools leaves build/ and *.egg-info in the source tree.
    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", ".venv*", ".tune", "__pycache__", "tests", "bench"))
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(source)],
        check=True, capture_output=True, cwd=tmp_path,
    )
    assert sorted(p.stem for p in (target / "saltext_shadowsocks_tuning" / "_utils").glob("sstuning_*.py")) == ENGINES
    # No file_roots to sync from: an empty directory.
    (tmp_path / "empty").mkdir()
    (tmp_path / "pillar").mkdir()
    (tmp_path / "pillar" / "top.sls").write_text("base:\n  '*':\n    - shadowsocks\n")
    conf = tmp_path / "t.conf"
    # The open-file part stays off the host's supervisor and shadowsocks-libev files.
    (tmp_path / "pillar" / "shadowsocks.sls").write_text(json.dumps({"shadowsocks": {"tuning": {
        "config": str(conf), "limits": {"supervisor": None, "shadowsocks_libev": None}}}}))
    config = tmp_path / "conf"
    config.mkdir()
    (config / "minion").write_text(
        f"file_client: local\ncachedir: {tmp_path}/cache\nextension_modules: {tmp_path}/extmods\n"
        f"pki_dir: {tmp_path}/pki\nlog_file: {tmp_path}/log\nfile_roots: {{base: [{tmp_path}/empty]}}\n"
        f"pillar_roots: {{base: [{tmp_path}/pillar]}}\n"
        f"shadowsocks_tuning.state_dir: {tmp_path}/state\n"
        f"shadowsocks_tuning.sysctl_dirs: [{tmp_path}/sysctl.d]\n"
        f"shadowsocks_tuning.sysctl_conf: {tmp_path}/sysctl.conf\n"
        f"shadowsocks_tuning.modules_load_dir: {tmp_path}/modules-load.d\n"
    )
    env = dict(os.environ, PYTHONPATH=str(target))

    result = salt_call(config, "shadowsocks_tuning.get", "net.core.somaxconn", env=env, netns=netns, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["local"] == " ".join(read_in_netns(netns, "net.core.somaxconn"))

    result = salt_call(config, "state.single", "shadowsocks_tuning.tuned", "name=tuning", "test=True",
                       env=env, netns=netns, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    (ret,) = json.loads(result.stdout)["local"].values()
    # A fresh namespace is not tuned: the state predicts changes, and writes nothing.
    assert ret["result"] is None and ret["changes"], ret
    assert ret["comment"].startswith("Profile low-latency would be applied"), ret["comment"]
    assert str(conf) in ret["changes"] and not conf.exists()
    assert not (tmp_path / "extmods").exists() or not any((tmp_path / "extmods").rglob("*.py")), "something was synced"

    # Without the installed package the same calls have nothing to load.
    env.pop("PYTHONPATH")
    result = salt_call(config, "shadowsocks_tuning.get", "net.core.somaxconn", env=env, netns=netns, cwd=tmp_path)
    assert result.returncode != 0
    assert "'shadowsocks_tuning.get' is not available" in result.stdout + result.stderr
    result = salt_call(config, "state.single", "shadowsocks_tuning.tuned", "name=tuning", "test=True",
                       env=env, netns=netns, cwd=tmp_path)
    assert result.returncode != 0
    assert "Specified state 'shadowsocks_tuning.tuned' was not found" in result.stdout + result.stderr


# --------------------------------------------------------------------------
# file_roots + saltutil.sync_all
# --------------------------------------------------------------------------
def test_sync_all_ships_modules_states_and_engines_and_the_module_works(masterless):
    synced = masterless.cli.run("--local", "saltutil.sync_all")
    assert synced.returncode == 0, synced.stderr
    masterless.synced = True
    assert "modules.shadowsocks_tuning" in synced.data["modules"]
    assert "states.shadowsocks_tuning" in synced.data["states"]
    assert sorted(name for name in synced.data["utils"] if name.startswith("utils.sstuning_")) == [
        f"utils.{name}" for name in ENGINES]
    extmods = pathlib.Path(masterless.factory.config["extension_modules"])
    assert (extmods / "modules" / "shadowsocks_tuning.py").read_bytes() == (REPO / "_modules" / "shadowsocks_tuning.py").read_bytes()
    assert (extmods / "states" / "shadowsocks_tuning.py").read_bytes() == (REPO / "_states" / "shadowsocks_tuning.py").read_bytes()
    for name in ENGINES:
        assert (extmods / "utils" / f"{name}.py").read_bytes() == (REPO / "_utils" / f"{name}.py").read_bytes(), name

    got = masterless.run("shadowsocks_tuning.get", "net.core.somaxconn")
    assert got.returncode == 0, got.stderr
    assert got.data == " ".join(read_in_netns(masterless.netns, "net.core.somaxconn"))
    ret = masterless.run("state.single", "shadowsocks_tuning.tuned", "name=tuning", "test=True")
    (state,) = ret.data.values()
    assert state["result"] is None and state["changes"], state
    assert not masterless.config.exists()


# --------------------------------------------------------------------------
# A re-sync into a running minion
# --------------------------------------------------------------------------
OLD_DOC = "maximum listen() backlog"
NEW_DOC = "maximum listen() backlog (engine re-synced)"


def _catalogue_doc(cli, minion_id):
    result = cli.run("shadowsocks_tuning.catalogue", minion_tgt=minion_id)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.data["net.core.somaxconn"]["doc"]


@pytest.mark.slow
def test_a_resync_into_a_running_minion_replaces_the_engines_it_imported(salt_factories, tmp_path):
    """A real master and a real minion daemon (loopback, host network
    namespace: the minion only reads the catalogue). `multiprocessing: False`
    runs every job inside the minion's own long-lived process, where Python
    keeps the first import of each `sstuning_*` engine: after an engine file
    changes and `saltutil.sync_all` ships it, the execution module must use
    the new one without a minion restart."""
    roots = tmp_path / "file_roots"
    shutil.copytree(REPO / "salt", roots)  # _modules, _states, _utils become real directories
    engine = roots / "_utils" / "sstuning_catalogue.py"
    assert engine.is_file() and not engine.is_symlink()
    assert engine.read_text().count(f'"{OLD_DOC}"') == 1

    suffix = uuid.uuid4().hex[:8]
    master = salt_factories.salt_master_daemon(f"im-master-{suffix}", overrides={
        "auto_accept": True, "file_roots": {"base": [str(roots)]}})
    minion = master.salt_minion_daemon(f"im-minion-{suffix}", overrides={
        "multiprocessing": False,
        "enable_fqdns_grains": False,
        "shadowsocks_tuning.state_dir": str(tmp_path / "state"),
        "shadowsocks_tuning.sysctl_dirs": [str(tmp_path / "sysctl.d")],
        "shadowsocks_tuning.sysctl_conf": str(tmp_path / "sysctl.conf"),
        "shadowsocks_tuning.modules_load_dir": str(tmp_path / "modules-load.d"),
        "shadowsocks_tuning.init_dir": str(tmp_path / "init.d"),
    })
    cli = master.salt_cli(timeout=120)
    with master.started(), minion.started():
        pid = minion.pid
        first = cli.run("saltutil.sync_all", minion_tgt=minion.id)
        assert first.returncode == 0, first.stdout + first.stderr
        assert "utils.sstuning_catalogue" in first.data["utils"]
        assert _catalogue_doc(cli, minion.id) == OLD_DOC  # the engines are now imported in the daemon

        engine.write_text(engine.read_text().replace(f'"{OLD_DOC}"', f'"{NEW_DOC}"'))
        again = cli.run("saltutil.sync_all", minion_tgt=minion.id)
        assert again.returncode == 0, again.stdout + again.stderr
        assert again.data["utils"] == ["utils.sstuning_catalogue"]
        # The minion reloads its modules on the refresh event the sync fires: wait for it.
        deadline = time.monotonic() + 60
        doc = _catalogue_doc(cli, minion.id)
        while doc != NEW_DOC and time.monotonic() < deadline:
            time.sleep(1)
            doc = _catalogue_doc(cli, minion.id)
        assert doc == NEW_DOC, "the running minion kept the engine it imported before the re-sync"
        assert minion.pid == pid and minion.is_running(), "the minion was restarted"


def test_a_sync_without_the_engines_says_what_is_missing(make_masterless, tmp_path):
    """file_roots that ship the module but not `_utils` (an old checkout, a
    partial copy): the module does not load, and says why and what to do."""
    roots = tmp_path / "roots"
    shutil.copytree(REPO / "salt", roots, ignore=shutil.ignore_patterns("_utils"))
    minion = make_masterless(file_roots={"base": [str(roots)]})
    result = minion.run("shadowsocks_tuning.get", "net.core.somaxconn")
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert "its engines (_utils/sstuning_*.py) were not found; run saltutil.sync_all" in out, out
