"""``python -m app <command>``: serve, train, eval-exits, bench, build-tiny."""

from app.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
