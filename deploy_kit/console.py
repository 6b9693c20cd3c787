"""The `deploykit` console script. Importing the CLI pulls in click, torch and the exporters,
which takes seconds: a Ctrl-C in that window must give the same one line and exit 130 as a
Ctrl-C during a command (deploy_kit/cli: handle_errors), not a KeyboardInterrupt traceback."""

from __future__ import annotations

import sys

INTERRUPTED = 130


def main() -> None:
    try:
        from deploy_kit.cli import main as cli

        cli()
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(INTERRUPTED)


if __name__ == "__main__":  # `python -m deploy_kit.console`, as the tests start concurrent exports
    main()
