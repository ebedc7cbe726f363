"""Entry point of the ``molora`` command: imports the package without registering it with PEFT yet (no torch
import), so that recipes and arguments are checked in well under a second; see :mod:`molora.run.cli`."""
import os
import sys


def main() -> int:
    # Nothing is fetched from a hub at run time: set before any Hugging Face library reads its settings.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["MOLORA_DEFER_IMPORT"] = "1"
    try:
        from molora.run.cli import main as cli_main
    finally:
        os.environ.pop("MOLORA_DEFER_IMPORT", None)  # never leaks into processes the command starts
    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
