"""The wire layer: what daemon and client agree on, with no Twisted in it.

Errors and their codes, the job record, msgpack with strict limits, the frame format and
request envelope, per-method parameter schemas, the hello rules, and the TLS policy as data.
"""
