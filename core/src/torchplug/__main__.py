"""``python -m torchplug``: the same CLI as the ``torchplug`` command."""

from torchplug.cli import main

raise SystemExit(main())
