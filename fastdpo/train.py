"""`python -m fastdpo.train [options]` (and `accelerate launch -m fastdpo.train ...`): see fastdpo.cli."""

from .cli import train_main

if __name__ == "__main__":
    raise SystemExit(train_main())
