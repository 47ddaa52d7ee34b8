"""``python -m prsmed.train ...`` and ``torchrun --nproc-per-node N -m prsmed.train ...``: the same options as
``prsmed train``."""

import typer

from prsmed.train.cli import train


def main() -> None:
    typer.run(train)


if __name__ == "__main__":
    main()
