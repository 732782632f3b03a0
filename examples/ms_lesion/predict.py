"""Segment new subjects with a trained model: ``python predict.py --help`` (the code: ``mslesion/predict.py``)."""

import sys

from mslesion.predict import main

if __name__ == "__main__":
    sys.exit(main())
