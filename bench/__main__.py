"""``python -m flashlite.bench``: the same as ``flashlite bench``."""
import sys

from .runner import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m flashlite.bench"))
