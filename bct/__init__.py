"""BCT-Gen: blockwise compression of transformers, from checkpoint to checked RTL."""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("bct-gen")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

