from twisted.application.service import ServiceMaker

JobWorker = ServiceMaker(
    "jobworker",
    "jobworker.daemon.tap",
    "Run Linux processes for mutually authenticated clients over TLS 1.3.",
    "jobworker",
)
