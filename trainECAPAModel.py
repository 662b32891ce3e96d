"""The original's entry point, from a checkout: `python trainECAPAModel.py --help` (speakerkit/cli.py; installed,
the same program is the `speakerkit` command)."""

from speakerkit.cli import main

if __name__ == '__main__':
    main()
