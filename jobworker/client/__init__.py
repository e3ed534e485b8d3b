"""The client: its API, ``jwclient``'s parsing and commands, rendering and batch files.

Kept empty so that ``jwclient``'s argument parsing imports no Twisted.
"""
