"""A minimal Django project whose every log line carries its request's id.

See ``docs/howto/django.rst``. Serve it from this folder with::

    gunicorn -k asl_gevent.gunicorn.GeventWorker -w 2 mysite.wsgi:application
"""
