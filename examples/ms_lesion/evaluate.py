"""Evaluate a trained model on labelled subjects: ``python evaluate.py --help`` (the code: ``mslesion/evaluate.py``)."""

import sys

from mslesion.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
