"""`python -m certssb` (also what torchrun launches) runs the CLI."""
import sys

from .cli import main

sys.exit(main())
