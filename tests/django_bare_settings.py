"""Negative control for tests/test_django.py: the example project's settings
without asl_gevent's Django middleware (served as Django's own, unwrapped WSGI
application, it gives no request an id)."""

from mysite.settings import *  # noqa: F401,F403
from mysite.settings import MIDDLEWARE

MIDDLEWARE = [name for name in MIDDLEWARE if not name.startswith("asl_gevent.")]
