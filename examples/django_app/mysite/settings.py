"""Settings of the example project: what asl_gevent needs is MIDDLEWARE and LOGGING."""

SECRET_KEY = "example-only-not-a-secret"  # never use this key for a real site
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]

# "mysite" is an app too: its AppConfig connects the signal handlers.
INSTALLED_APPS = ["mysite"]
ROOT_URLCONF = "mysite.urls"
# `manage.py runserver` serves this, so it gets the WSGI middleware too.
WSGI_APPLICATION = "mysite.wsgi.application"
DATABASES: dict = {}
USE_TZ = True

# Gives requests that never pass through mysite.wsgi (Django's test Client)
# their id. Under the wrapped WSGI application it finds the request's store
# already there and does nothing.
MIDDLEWARE = [
    "asl_gevent.django.RequestIdMiddleware",
    "django.middleware.common.CommonMiddleware",
]

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {
        # Puts the current request's id on every record as %(request_id)s
        # ("-" outside a request).
        "request_id": {"()": "asl_gevent.logfilter.StoreFilter"},
    },
    "formatters": {
        "tagged": {"format": "[%(request_id)s] %(name)s: %(message)s"},
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "filters": ["request_id"],
                    "formatter": "tagged"},
    },
    "root": {"handlers": ["console"], "level": "INFO"},
    "loggers": {
        # Django's own loggers (django.request: 404s, 500s) through the same
        # handler instead of Django's default ones.
        "django": {"handlers": ["console"], "level": "INFO", "propagate": False},
    },
}
