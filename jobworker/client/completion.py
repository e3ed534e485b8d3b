"""``jwclient completion bash|zsh``: shell completion generated from the parser itself.

shtab writes the script from argparse's own tables, so options added to jwclient complete
without anyone editing a script; it is imported by this command only.
"""

from __future__ import annotations

import argparse


def script(parser: argparse.ArgumentParser, shell: str) -> str:
    """The completion script for ``shell`` (bash or zsh)."""
    import shtab

    text: str = shtab.complete(parser, shell=shell)
    return text if text.endswith("\n") else text + "\n"
