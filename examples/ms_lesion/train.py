"""Train a 3-D U-Net for MS-lesion segmentation, then evaluate it: ``python train.py --help`` (the code: ``mslesion/train.py``)."""

import sys

from mslesion.train import main

if __name__ == "__main__":
    sys.exit(main())
