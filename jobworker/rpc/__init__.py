"""The RPC layer on Twisted: framing, request correlation, mutual TLS and prompt writes."""
