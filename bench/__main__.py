"""``python -m bench`` is ``python -m bench.run``."""

from .run import main

raise SystemExit(main())
