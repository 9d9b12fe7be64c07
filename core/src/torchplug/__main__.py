"""``python -m torchplug``: the same CLI as the ``torchplug`` command."""

import os
import sys

# `python -m` puts the working directory first on sys.path. Plugins come only from installed
# distributions: a ./<plugin>.py or ./<name>.dist-info must not shadow or add one (the
# `torchplug` script never had the working directory there). `torchplug fit` appends it itself.
if sys.path and sys.path[0] in ("", os.getcwd()):
    del sys.path[0]

from torchplug.cli import main

raise SystemExit(main())
