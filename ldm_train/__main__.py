"""``python -m ldm_train``: the ``ldm-train`` command."""
from ldm_train.cli import main

raise SystemExit(main())
