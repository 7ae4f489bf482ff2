"""``python -m service.cli``: the ``ircnn`` command."""

import sys

from service.cli import main

sys.exit(main())
