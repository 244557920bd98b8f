"""tokencap: run an AI agent under a hard budget."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tokencap-cli")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
