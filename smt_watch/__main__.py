"""``python -m smt_watch`` runs the CLI (tests use this to run the exact code under test)."""

from smt_watch.cli import main

if __name__ == "__main__":  # a watch worker process (spawn) imports this module again as __mp_main__
    main()
