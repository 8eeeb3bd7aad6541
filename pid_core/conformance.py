"""`python -m pid_core.conformance ...` = `python -m pid_core conformance ...` (kept for the scripts that call it this way)."""

if __name__ == "__main__":
    import sys

    from .commands import main

    sys.exit(main(["conformance", *sys.argv[1:]]))
