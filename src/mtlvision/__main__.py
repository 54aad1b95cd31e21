"""`python -m mtlvision` (and `torchrun -m mtlvision`) entry point."""
import sys

from .cli import main

sys.exit(main())
