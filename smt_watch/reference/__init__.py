"""Demo and test tooling, apart from the service: nothing under ``smt_watch`` outside this package imports it.

- :mod:`~smt_watch.reference.receiver` (``smt-watch receive``): a local stand-in for the IntelliWatt web app
  and the droplet upload server, with fault injection for tests.
- :mod:`~smt_watch.reference.receiver_raw`: its ``raw-upload`` route, by the real route's rules.
- :mod:`~smt_watch.reference.sample` (``smt-watch sample``): realistic SMT files (CSV, ZIP, ``.asc``).

Only ``cli.py`` reaches in here, lazily, for those two commands.
"""
