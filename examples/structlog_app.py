"""structlog: the request id on every event, in spawned greenlets too.

Two ways, both shown: ``store_processor()`` reads the middleware's store
(``asl_gevent.wsgi.request_storage``), and structlog's own
``bind_contextvars`` works in spawned greenlets because the hooks copy the
whole context into them.

    $ python examples/structlog_app.py
    request_id='req-1' user='ada' event='handling'
    request_id='req-1' user='ada' event='child greenlet'
    request_id='req-2' user='bob' event='handling'
    request_id='req-2' user='bob' event='child greenlet'
    event='outside any request'
"""

import gevent
import structlog

from asl_gevent.logfilter import store_processor
from asl_gevent.wsgi import request_storage

structlog.configure(
    processors=[
        structlog.contextvars.merge_contextvars,   # structlog's own contextvars
        store_processor(),                         # request_id from the store
        structlog.processors.KeyValueRenderer(key_order=["request_id", "user", "event"],
                                              drop_missing=True),
    ],
    logger_factory=structlog.PrintLoggerFactory(),
)
log = structlog.get_logger()


def handler(user: str) -> None:
    structlog.contextvars.bind_contextvars(user=user)
    log.info("handling")
    gevent.spawn(log.info, "child greenlet").join()


if __name__ == "__main__":
    for n, user in ((1, "ada"), (2, "bob")):
        # What RequestContextMiddleware does for each request:
        request_storage.run({"request_id": f"req-{n}"}, handler, user)
    log.info("outside any request")
