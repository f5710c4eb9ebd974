"""asl_gevent._hooks imported afresh (``del sys.modules[...]``) while installed.

The new copy must see the hooks of the old one as installed, remove all of
them (the spawn callback included), and install its own without any hook
calling itself. Prints one JSON line (tests/test_install.py).
"""
import importlib
import json
import sys

import gevent
import gevent.hub

import asl_gevent

old = asl_gevent._hooks
greenlet_class = old.Greenlet
asl_gevent.uninstall()
pristine = (vars(greenlet_class)["run"], vars(greenlet_class)["rawlink"], gevent.spawn_raw)
asl_gevent.install()
als = asl_gevent.AsyncLocalStorage(name="reimport")
del sys.modules["asl_gevent._hooks"]
fresh = importlib.import_module("asl_gevent._hooks")
out = {"fresh": fresh is not old, "sees_installed": fresh.is_installed()}
fresh.uninstall()
out["pristine"] = (vars(greenlet_class)["run"], vars(greenlet_class)["rawlink"],
                   gevent.spawn_raw) == pristine
out["after_uninstall"] = als.run("request", lambda: gevent.spawn(als.get_store).get(timeout=5))
out["old_module_agrees"] = old.is_installed() is False
fresh.install()
box = []
glet = gevent.spawn(gevent.sleep, 0.001)
als.run("request", glet.link, lambda g: box.append(als.get_store()))
glet.join()
gevent.sleep(0.01)
out["after_install"] = [als.run("request", lambda: gevent.spawn(als.get_store).get(timeout=5)),
                        box]
print(json.dumps(out))
