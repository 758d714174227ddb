"""The three ways the package reaches a minion, each through real Salt:
installed by pip (the Salt loader finds it through its entry point, no
file_roots; the wheel, built from the sdist, installed alone into a fresh
venv, serves `state.apply shadowsocks.tuning` from the file_roots path it
prints), shipped by file_roots and `saltutil.sync_all` (modules, states
and the `_utils` engines land in extmods), and a re-sync into a minion daemon
that keeps running (the execution module must not keep a stale engine).
salt-ssh, the fourth, is tests/integration/test_salt_ssh.py."""

import json
import os
import pathlib
import re
import resource
import shutil
import subprocess
import sys
import tarfile
import time
import uuid
import zipfile

import pytest

from support.common import REPO, live_values, read_in_netns

from sstuning_catalogue import CATALOGUE  # the flat engine file (pytest.ini puts _utils on sys.path)

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
    conf = tmp_path / "sysctl.d" / "t.conf"
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

    # The open-file half is a second module file under the same name.
    result = salt_call(config, "shadowsocks_tuning.validate_nofile", "4096", env=env, netns=netns, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["local"] == 4096

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
# The sdist and the wheel, and a fresh venv with nothing but Salt and the wheel
# --------------------------------------------------------------------------
# What a checkout holds that is no part of the package (caches, venvs, builds).
_NOT_SOURCE = shutil.ignore_patterns(".git", ".venv*", ".tune", ".test-logs", ".hypothesis", "__pycache__",
                                     "build", "dist", "*.egg-info")
FLAT_DIRS = ("_modules", "_states", "_beacons", "_utils")
SLS = sorted(p.name for p in (REPO / "salt" / "shadowsocks" / "tuning").glob("*.sls"))


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    """The sdist, and the wheel `python -m build` makes from that sdist (so a
    file the sdist lacks fails the wheel too), from a copy of this checkout
    with its links kept. Isolated build: setuptools comes from the package
    index, as for any user."""
    root = tmp_path_factory.mktemp("dists")
    source = root / "src"
    shutil.copytree(REPO, source, symlinks=True, ignore=_NOT_SOURCE)
    built = subprocess.run([sys.executable, "-m", "build", "--outdir", str(root / "dist"), str(source)],
                           capture_output=True, text=True, cwd=root)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (sdist,) = (root / "dist").glob("*.tar.gz")
    (wheel,) = (root / "dist").glob("*.whl")
    return {"source": source, "sdist": sdist, "wheel": wheel}


def test_the_wheel_ships_sls_pillar_example_license_and_every_flat_module(dists):
    with zipfile.ZipFile(dists["wheel"]) as whl:
        names = set(whl.namelist())
        pkg = "saltext_shadowsocks_tuning"
        for sls in SLS:
            assert whl.read(f"{pkg}/file_roots/shadowsocks/tuning/{sls}") == (
                REPO / "salt" / "shadowsocks" / "tuning" / sls).read_bytes(), sls
        # Only the SLS tree: the flat modules reach a pip install by its entry point, not by sync.
        assert sorted(n for n in names if n.startswith(f"{pkg}/file_roots/")) == [
            f"{pkg}/file_roots/shadowsocks/tuning/{sls}" for sls in SLS]
        assert whl.read(f"{pkg}/pillar.example") == (REPO / "pillar.example").read_bytes()
        (license_file,) = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
        assert whl.read(license_file) == (REPO / "LICENSE").read_bytes()
        assert b"Apache License" in whl.read(license_file)
        for flat in FLAT_DIRS:
            shipped = sorted(n.rsplit("/", 1)[1] for n in names if n.startswith(f"{pkg}/{flat}/") and n.endswith(".py"))
            assert shipped == sorted(p.name for p in (REPO / flat).glob("*.py")), flat
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = whl.read(metadata).decode()
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        entry = whl.read(entry_points).decode()
    version = {}
    exec((REPO / "saltext_shadowsocks_tuning" / "version.py").read_text(), version)  # pylint: disable=exec-used
    assert f"\nVersion: {version['__version__']}\n" in meta
    assert "\nName: salt-shadowsocks-tuning\n" in meta
    assert "\nLicense-Expression: Apache-2.0\n" in meta
    assert "salt-extension" in re.search(r"\nKeywords: (.*)\n", meta).group(1).split(",")
    assert "\nRequires-Dist: salt>=3006\n" in meta
    assert "[salt.loader]\nshadowsocks_tuning = saltext_shadowsocks_tuning:loader_dirs" in entry


def test_the_sdist_holds_the_tests_the_benchmarks_the_docs_and_the_license(dists):
    with tarfile.open(dists["sdist"]) as sdist:
        top = sdist.getnames()[0].split("/")[0]
        names = {n.split("/", 1)[1] for n in sdist.getnames() if "/" in n}
    source = dists["source"]
    for tree in ("tests", "bench", "docs"):
        files = {str(p.relative_to(source)) for p in (source / tree).rglob("*")
                 if p.is_file() and "__pycache__" not in p.parts}
        assert files and not files - names, f"{tree} files missing from {top}: {sorted(files - names)}"
    assert "tests/support/common.py" in names
    for name in ("LICENSE", "README.md", "pillar.example", "MANIFEST.in", "pyproject.toml", "setup.py",
                 "requirements-test.txt", "run-tests", "tune"):
        assert name in names, name
    for sls in SLS:
        assert f"salt/shadowsocks/tuning/{sls}" in names


@pytest.mark.slow
def test_the_wheel_alone_in_a_fresh_venv_applies_from_the_printed_file_roots(dists, netns, tmp_path):
    """What a pip-only user does: a fresh venv with Salt (the pin of
    requirements-test.txt: the newest Salt does not install from this index),
    the wheel installed by itself (its `salt>=3006` requirement checked by
    pip), the one file_roots line from `python -m saltext_shadowsocks_tuning
    file-roots`, then a dry run of `state.apply shadowsocks.tuning` in a fresh
    network namespace: every state listed, nothing written."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
    python = venv / "bin" / "python"
    (salt_pin,) = [line for line in (REPO / "requirements-test.txt").read_text().splitlines() if line.startswith("salt==")]
    for what in (salt_pin, str(dists["wheel"])):
        done = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", what],
                              capture_output=True, text=True, cwd=tmp_path)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    printed = subprocess.run([str(python), "-m", "saltext_shadowsocks_tuning", "file-roots"],
                             capture_output=True, text=True, check=True, cwd=tmp_path).stdout.strip()
    file_roots = pathlib.Path(printed)
    assert file_roots.is_relative_to(venv) and (file_roots / "shadowsocks" / "tuning" / "init.sls").is_file(), printed

    pillar = tmp_path / "pillar"
    pillar.mkdir()
    (pillar / "top.sls").write_text("base:\n  '*':\n    - shadowsocks\n")
    # No pillar at all: where this box cannot grant the recipe's 51200 open
    # files, the unset nofile is the most it can grant, as ./tune would use.
    (pillar / "shadowsocks.sls").write_text(json.dumps({}))
    config = tmp_path / "conf"
    config.mkdir()
    # The user's minion config: only the file_roots line added to what Salt
    # needs (its own cache and keys here, not /var/cache/salt and /etc/salt).
    (config / "minion").write_text(
        f"file_client: local\nfile_roots: {{base: [{printed}]}}\npillar_roots: {{base: [{pillar}]}}\n"
        f"cachedir: {tmp_path}/cache\npki_dir: {tmp_path}/pki\nlog_file: {tmp_path}/log\n"
    )
    watched = [pathlib.Path(p) for p in ("/var/lib/shadowsocks_tuning", "/etc/sysctl.d/local.conf",
                                         "/etc/default/supervisor", "/etc/default/shadowsocks-libev",
                                         "/etc/supervisor/supervisord.conf", "/etc/modules-load.d")]

    def files():
        return {str(p): (p.read_bytes() if p.is_file() else sorted(os.listdir(p)) if p.is_dir() else None)
                for p in watched}

    files_before, kernel_before = files(), live_values(netns, sorted(CATALOGUE))
    result = subprocess.run(["ip", "netns", "exec", netns, str(venv / "bin" / "salt-call"), "-c", str(config),
                             "--local", "--out=json", "state.apply", "shadowsocks.tuning", "test=True"],
                            capture_output=True, text=True, cwd=tmp_path, env={"PATH": os.environ["PATH"]})
    assert result.returncode == 0, result.stdout + result.stderr
    rets = json.loads(result.stdout)["local"]
    assert {ret["__id__"] for ret in rets.values()} == {
        "shadowsocks-tuning-sysctl", "shadowsocks-tuning-nofile", "shadowsocks-tuning-nofile-verify"}
    acting = [ret for ret in rets.values() if ret["__id__"] != "shadowsocks-tuning-nofile-verify"]
    assert all(ret["result"] in (None, True) for ret in acting), rets
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 51200:
        (nofile,) = [ret for ret in rets.values() if ret["__id__"] == "shadowsocks-tuning-nofile"]
        assert f"nofile {hard}: the most this box can grant" in nofile["comment"], nofile["comment"]
    (tuned,) = [ret for ret in rets.values() if ret["__id__"] == "shadowsocks-tuning-sysctl"]
    # A fresh namespace is not tuned: the sysctl state predicts changes.
    assert tuned["result"] is None and tuned["changes"], tuned
    assert files() == files_before, "the dry run wrote a file"
    assert live_values(netns, sorted(CATALOGUE)) == kernel_before, "the dry run wrote the kernel"

    # The beacon reaches Salt's beacon loader through the same entry point.
    code = ("import sys, salt.config, salt.loader\n"
            "opts = salt.config.minion_config(sys.argv[1])\n"
            "print(sorted(salt.loader.beacons(opts, salt.loader.minion_mods(opts))))")
    loaded = subprocess.run([str(python), "-c", code, str(config / "minion")], capture_output=True, text=True,
                            cwd=tmp_path, check=True).stdout
    for beacon in (REPO / "_beacons").glob("*.py"):
        assert f"'{beacon.stem}.beacon'" in loaded, beacon.stem


# --------------------------------------------------------------------------
# file_roots + saltutil.sync_all
# --------------------------------------------------------------------------
def test_sync_all_ships_modules_states_and_engines_and_the_module_works(masterless):
    synced = masterless.cli.run("--local", "saltutil.sync_all")
    assert synced.returncode == 0, synced.stderr
    masterless.synced = True
    assert sorted(synced.data["modules"]) == sorted(f"modules.{p.stem}" for p in (REPO / "_modules").glob("*.py"))
    assert "states.shadowsocks_tuning" in synced.data["states"]
    assert sorted(name for name in synced.data["utils"] if name.startswith("utils.sstuning_")) == [
        f"utils.{name}" for name in ENGINES]
    extmods = pathlib.Path(masterless.factory.config["extension_modules"])
    for module in (REPO / "_modules").glob("*.py"):
        assert (extmods / "modules" / module.name).read_bytes() == module.read_bytes(), module.name
    assert (extmods / "states" / "shadowsocks_tuning.py").read_bytes() == (REPO / "_states" / "shadowsocks_tuning.py").read_bytes()
    for name in ENGINES:
        assert (extmods / "utils" / f"{name}.py").read_bytes() == (REPO / "_utils" / f"{name}.py").read_bytes(), name

    got = masterless.run("shadowsocks_tuning.get", "net.core.somaxconn")
    assert got.returncode == 0, got.stderr
    assert got.data == " ".join(read_in_netns(masterless.netns, "net.core.somaxconn"))
    # The open-file half is a second module file under the same name.
    got = masterless.run("shadowsocks_tuning.validate_nofile", "4096")
    assert got.returncode == 0 and got.data == 4096, got.stdout + got.stderr
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
    assert "its engines (_utils/sstuning_*.py) were not found" in out and "run saltutil.sync_all" in out, out
