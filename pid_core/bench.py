"""`python -m pid_core.bench ...` = `python -m pid_core bench ...` (kept for the scripts that call it this way)."""

if __name__ == "__main__":
    import sys

    from .commands import main

    sys.exit(main(["bench", *sys.argv[1:]]))
