"""gunicorn config for people who keep the stock ``-k gevent`` worker.

Use it with an app wrapped in :class:`asl_gevent.wsgi.RequestContextMiddleware`::

    gunicorn -c examples/gunicorn_conf.py examples.flask_gunicorn:app

``post_worker_init`` runs in each worker after gunicorn's
``monkey.patch_all()``, so the hooks go onto the patched modules. (The gevent
plugin entry point installs them at ``patch_all()`` time too; saying it here
keeps the config correct if the plugin is ever disabled.) The stock worker
serves all requests of a keep-alive connection in one context, so the
middleware is what gives each request a fresh one. With
``-k asl_gevent.gunicorn.GeventWorker`` neither this file nor the middleware
is needed for isolation.
"""

import asl_gevent

worker_class = "gevent"


def post_worker_init(worker):  # type: ignore[no-untyped-def]
    asl_gevent.install()
    worker.log.debug("asl_gevent hooks installed in worker %s", worker.pid)
