"""Write the synthetic MS cohort to disk: ``python make_cohort.py --help`` (the code: ``mslesion/make_cohort.py``)."""

import sys

from mslesion.make_cohort import main

if __name__ == "__main__":
    sys.exit(main())
