"""Does monkey.patch_all install the hooks with no asl_gevent call? (test_propagation)"""
import sys

from gevent import monkey

monkey.patch_all()
print("asl_gevent._hooks" in sys.modules)
import asl_gevent  # noqa: E402

print(asl_gevent.is_installed())
