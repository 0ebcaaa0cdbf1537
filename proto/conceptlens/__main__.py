"""``python -m conceptlens`` == the ``conceptlens`` command."""
import sys

from conceptlens.service.cli import main

sys.exit(main())
