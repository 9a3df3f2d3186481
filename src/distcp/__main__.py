"""``python -m distcp``: the ``distcp`` command line."""

from distcp.cli import main

if __name__ == "__main__":
    main(prog_name="distcp")
