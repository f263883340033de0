"""``python -m a3q`` is the ``a3q`` command (so ``torchrun -m a3q run …`` works too)."""

from a3q.cli import app

if __name__ == "__main__":
    app(prog_name="a3q")
