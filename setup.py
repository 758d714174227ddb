"""salt-shadowsocks-tuning: Salt execution and state modules, SLS and profiles
that apply the "Optimizing Shadowsocks" kernel and open-file tuning."""

from setuptools import setup

setup(
    name="salt-shadowsocks-tuning",
    version="0.1.0",
    description="Salt extension: shadowsocks kernel sysctl and open-file-limit tuning",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.8",
    # The flat module files stay at the repository root (_modules, _states, _utils),
    # where file_roots and salt-ssh expect them; pip ships them inside the package.
    packages=[
        "saltext_shadowsocks_tuning",
        "saltext_shadowsocks_tuning._modules",
        "saltext_shadowsocks_tuning._states",
        "saltext_shadowsocks_tuning._utils",
    ],
    package_dir={
        "saltext_shadowsocks_tuning._modules": "_modules",
        "saltext_shadowsocks_tuning._states": "_states",
        "saltext_shadowsocks_tuning._utils": "_utils",
    },
    install_requires=["salt>=3006"],
    entry_points={
        "salt.loader": ["shadowsocks_tuning = saltext_shadowsocks_tuning:loader_dirs"],
    },
)
