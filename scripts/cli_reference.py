"""Regenerate the CLI reference (docs/cli.md) from the real `--help` output, or check it (`--check`).

Kept under its old name for muscle memory: it runs scripts/docs.py, which writes every generated doc
(docs/cli.md, docs/settings.md, the settings list of docs/contract.md §1). `--write` (or no flag) rewrites
them; `--check` exits 1 naming what is stale and the command that fixes it.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from docs import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
