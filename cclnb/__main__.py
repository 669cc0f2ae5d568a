"""`python -m cclnb ...` is the same as the `cclnb` console script."""

from cclnb.commands.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
