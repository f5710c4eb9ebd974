"""The WSGI application, wrapped so that every request runs with its own id.

``RequestContextMiddleware`` gives each request a fresh store
``{"request_id": ...}`` (from the ``X-Request-ID`` header, or generated) and
keeps it current while Django runs: its ``request_started`` handlers, the
middleware and the view, every greenlet they spawn, and the response's
``close()``, where Django sends ``request_finished``. Serve it with::

    gunicorn -k asl_gevent.gunicorn.GeventWorker -w 2 mysite.wsgi:application
"""

import os

from django.core.wsgi import get_wsgi_application

from asl_gevent.wsgi import RequestContextMiddleware

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")

application = RequestContextMiddleware(get_wsgi_application())
