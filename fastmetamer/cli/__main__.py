"""``python -m fastmetamer.cli``."""
from .main import main

raise SystemExit(main())
