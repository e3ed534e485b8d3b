"""jobworker: run Linux processes for mutually authenticated clients."""

__version__ = "0.1.0"

#: Version of the wire protocol; bumped on any incompatible change.
PROTOCOL_VERSION = 1
