"""After an explicit uninstall(), monkey.patch_all() does not install again.
(tests/test_install.py)

Prints: installed after the first storage, after uninstall() and a new
storage, after patch_all(), what a spawned greenlet saw then, installed after
an explicit install(), and what a spawned greenlet saw then.
"""
import asl_gevent

als = asl_gevent.AsyncLocalStorage(name="a")
first = asl_gevent.is_installed()
asl_gevent.uninstall()
asl_gevent.AsyncLocalStorage(name="b")
second = asl_gevent.is_installed()

from gevent import monkey  # noqa: E402

monkey.patch_all()
import gevent  # noqa: E402

after_patch = asl_gevent.is_installed()
seen_off = als.run("r1", lambda: gevent.spawn(als.get_store).get())
asl_gevent.install()
print(first, second, after_patch, seen_off, asl_gevent.is_installed(),
      als.run("r1", lambda: gevent.spawn(als.get_store).get()))
