"""`python -m edgeq.cli`: the same as the `edgeq` command."""

from edgeq.cli import app

if __name__ == "__main__":
    app()
