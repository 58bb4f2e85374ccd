"""``python -m taskwatch.tui``: the same as the ``taskwatch`` command."""

from .cli import main

raise SystemExit(main())
