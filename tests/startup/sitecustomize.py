"""Run by every Python process the tests start with this directory on ``PYTHONPATH`` (conftest's
``SUBPROCESS_PYTHONPATH``, which ``base_env`` carries): before anything else, the process is made unable to
import trio.

trio is in this virtualenv only because the test extras install selenium (tests/test_browser.py), and httpcore
imports it whenever it can (``httpcore/_synchronization.py``, for trio's async locks): ~0.1 s of CPU (import of
smt_watch.watch: 472 -> 364 ms, 15 alternating starts each) in every ``watch`` and ``post`` process. 131
processes started with this path in the 453 most process-heavy tests (not all of them watch or post; serve, sync
and the reference servers never import httpcore). An install of the product has no trio, so this is its
start-up, not a change to it: smt-watch never runs under trio (its HTTP is httpcore's sync API, serve's is asyncio),
and httpcore treats a trio it cannot import as absent. Only subprocesses: the test processes themselves never
read this (selenium's CDP connection uses trio).
"""

import sys

sys.modules.setdefault("trio", None)  # type: ignore[assignment]  # None: ``import trio`` raises ImportError
