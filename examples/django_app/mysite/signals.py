"""Handlers of Django's request signals: they log with the request's id.

Under the wrapped WSGI application (mysite.wsgi) ``request_started`` runs
inside the request's context, and ``request_finished`` runs when the server
closes the response, which the middleware also does in the request's context.
"""

import logging
from typing import Any

log = logging.getLogger(__name__)


def on_request_started(sender: Any, environ: Any, **kwargs: Any) -> None:
    log.info("request started: %s %s", environ["REQUEST_METHOD"], environ["PATH_INFO"])


def on_request_finished(sender: Any, **kwargs: Any) -> None:
    log.info("request finished")
