"""``python -m cctuning.cli``: the ``cctuning`` command (as ``accelerate launch -m cctuning.cli``)."""

import sys

from cctuning.cli import main

sys.exit(main())
