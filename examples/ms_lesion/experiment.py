"""The paper's experiment (Table 1): every method on the same random splits: ``python experiment.py --help`` (the code: ``mslesion/experiment.py``)."""

import sys

from mslesion.experiment import main

if __name__ == "__main__":
    sys.exit(main())
