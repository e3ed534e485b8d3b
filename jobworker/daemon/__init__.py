"""The daemon: connections, one handler per method, follow streams, authorization, audit,
and the ``twistd jobworker`` options and service tree."""
