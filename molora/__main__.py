"""``python -m molora COMMAND ...``: the ``molora`` command (e.g. ``deepspeed --module molora train RECIPE.yaml``)."""
import sys

from molora.run.cli import main

sys.exit(main())
