import sys

from .quiet import quiet_libraries
from .threads import passive_openmp

passive_openmp()
quiet_libraries()

from .cli import main  # noqa: E402

sys.exit(main())
