"""``python -m seedstory`` and the ``seedstory`` command."""
import sys

from .quiet import quiet_libraries
from .threads import passive_openmp


def entry() -> int:
    # before torch is imported: idle OpenMP threads sleep, and libraries say only what the user needs
    passive_openmp()
    quiet_libraries()
    from .cli import main

    return main()


if __name__ == "__main__":
    sys.exit(entry())
