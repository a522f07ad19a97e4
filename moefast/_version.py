"""moefast's version, the one place it is written (``moefast.__version__``; the build reads it
here, pyproject.toml's ``metadata.version.input``). A module of its own, importing nothing, so
that every room can read it without importing the package's ``__init__``."""

__version__ = "0.1.0"
