"""The package version, in this one place: pyproject.toml reads it
(`[tool.setuptools.dynamic]`) and the package exports it as `__version__`."""

__version__ = "0.1.0"
