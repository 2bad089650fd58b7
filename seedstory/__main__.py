import sys

from .threads import passive_openmp

passive_openmp()

from .cli import main  # noqa: E402

sys.exit(main())
