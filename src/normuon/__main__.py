"""``python -m normuon`` runs the command line (see :mod:`normuon.cli`)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
