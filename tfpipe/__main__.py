"""`python -m tfpipe`: the `tfpipe` command line (see `tfpipe.cli`)."""

from tfpipe.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
