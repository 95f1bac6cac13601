"""``python -m bilevel.metalearn {train,eval,report}``: the command line (`training.cli`)."""

from .training.cli import main as main

if __name__ == "__main__":
    raise SystemExit(main())
