"""``python -m trl_entropy.cli`` (and ``accelerate launch -m trl_entropy.cli``) runs the ``trl-entropy`` command."""

import sys

from .main import main

sys.exit(main())
