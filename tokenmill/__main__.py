import sys

from tokenmill.cli import main

# Guarded: the engine's own process (engine_process.py) is spawned, and a spawned child imports this module again.
if __name__ == "__main__":
    sys.exit(main())
