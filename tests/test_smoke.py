"""The two-command promise: a daemon starts, and jwclient talks to it."""

from __future__ import annotations


def test_whoami_prints_identity_and_role(daemon) -> None:  # type: ignore[no-untyped-def]
    """``jwclient whoami`` prints the identity and role from the certificate."""
    result = daemon.jwclient("whoami", identity="alice", check=True)
    assert result.stdout.decode().split() == ["identity:", "alice", "role:", "user"]
    assert daemon.tracebacks() == []
