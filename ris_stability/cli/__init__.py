"""`risdiag`: the command line (and, with the live view, the only code that writes to the terminal)."""

from ris_stability.cli.app import (EXIT_NONFINITE, EXIT_NOT_REPRODUCED, EXIT_OK, EXIT_USAGE, main, nonnegative_int,
                                    positive_int)

__all__ = ["EXIT_NONFINITE", "EXIT_NOT_REPRODUCED", "EXIT_OK", "EXIT_USAGE", "main", "nonnegative_int", "positive_int"]
