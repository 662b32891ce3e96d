"""Data preparation, from a checkout: `python prepare.py --help` (speakerkit/prepare.py; installed, the same
program is the `speakerkit-prepare` command)."""

import sys

from speakerkit.prepare import main

if __name__ == '__main__':
    sys.exit(main())
