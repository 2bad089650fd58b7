"""``python -m seedstory`` and the ``seedstory`` command."""
import sys

from .quiet import quiet_libraries
from .threads import passive_openmp

passive_openmp()  # on import, before anything imports torch: idle OpenMP threads sleep


def entry() -> int:
    quiet_libraries()
    from .cli import main

    return main()


if __name__ == "__main__":
    sys.exit(entry())
