"""The probe moved into the library: ``python -m ringfence.local.probe`` (``PROBE`` in
:mod:`ringfence.local.lab`). Kept runnable for branches written against the old path."""

import sys

from ringfence.local.probe import main

if __name__ == "__main__":
    sys.exit(main())
