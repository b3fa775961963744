"""``python -m smt_watch`` runs the CLI (tests use this to run the exact code under test)."""

from smt_watch.cli import main

main()
