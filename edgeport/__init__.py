"""edgeport: ship a Hugging Face checkpoint to Apple Silicon and edge NPUs."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("edgeport")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
