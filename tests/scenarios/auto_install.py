"""Does ASL_GEVENT_AUTO_INSTALL turn the automatic install off? (tests/test_install.py)

Prints: installed after patch_all, installed after the first storage,
installed after an explicit install(), and what a spawned greenlet saw.
"""
from gevent import monkey

monkey.patch_all()
import gevent  # noqa: E402

import asl_gevent  # noqa: E402

after_patch_all = asl_gevent.is_installed()
als = asl_gevent.AsyncLocalStorage()
after_first_storage = asl_gevent.is_installed()
asl_gevent.install()
print(after_patch_all, after_first_storage, asl_gevent.is_installed(),
      als.run("x", lambda: gevent.spawn(als.get_store).get()))
