"""salt-shadowsocks-tuning: Salt execution, state and beacon modules, SLS and
profiles that apply the "Optimizing Shadowsocks" kernel and open-file tuning.

Metadata, the entry point and the version (saltext_shadowsocks_tuning/version.py)
live in pyproject.toml. This file only maps the repository's layout into the
package, which pyproject.toml cannot say as plainly."""

import os

from setuptools import setup

# The flat module files stay at the repository root (_modules, _states,
# _beacons, _utils), where file_roots and salt-ssh expect them; pip ships them
# inside the package. A directory that is not there yet (a checkout from
# before the beacon) is skipped rather than failing the build.
FLAT = [name for name in ("_modules", "_states", "_beacons", "_utils") if os.path.isdir(name)]

setup(
    packages=["saltext_shadowsocks_tuning"] + [f"saltext_shadowsocks_tuning.{name}" for name in FLAT],
    package_dir={f"saltext_shadowsocks_tuning.{name}": name for name in FLAT},
    # The SLS tree and pillar.example (links to salt/ and ./pillar.example in
    # the checkout), for `python -m saltext_shadowsocks_tuning file-roots`.
    # Listed, not `include_package_data`: file_roots/ also links the flat
    # modules (for sync_all), which a pip install registers by entry point.
    package_data={"saltext_shadowsocks_tuning": ["file_roots/shadowsocks/tuning/*.sls", "pillar.example"]},
    include_package_data=False,
)
