"""``python -m eggroll_rl``: the ``eggroll-rl`` command line."""

from eggroll_rl.cli import main

if __name__ == "__main__":
    main()
