"""The jobworker PKI: the certificate library (``certs``) and ``jobworker-certs`` (``cli``).

Its face is the library, for tests and tools: ``from jobworker import pki; pki.make_ca()``.
"""

from jobworker.pki.certs import *  # noqa: F403 (the library's __all__ is this package's face)
from jobworker.pki.certs import __all__ as _library
from jobworker.pki.cli import main

__all__ = [*_library, "main"]
