"""PLM: payment-transaction foundation model (see README.md)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("plm")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0+unknown"
