"""mslesion: the MS-lesion segmentation pipeline of sliceattn's example, as one package.

The data flows one way, and so do the subpackages:

* ``data``: find subjects in a folder, read and check their NIfTI files (``reading``), training crops
  (``sampling``) and their augmentation (``augment``);
* ``synthetic``: the synthetic MS cohort (the demo's and the tests' data; a user with real scans can
  ignore it);
* ``model``: the 3-D U-Net with the paper's attention placements (``unet``) and the losses (``loss``);
* ``training``: the loop as named steps (``loop``), the attention monitor, device/threads/autocast
  (``runtime``);
* ``inference``: sliding-window prediction, lesion reports, the onnxruntime engine;
* ``evaluation``: metrics, paired statistics, the experiment's report, figures.

Beside them: ``config`` (the frozen training configuration and the flag-to-field table), ``checkpoint``
(the one module that writes and reads ``model.pt``/``checkpoint.pt``), ``run`` (a run folder's files),
``cli`` (the options the commands share). The commands ``train``, ``evaluate``, ``predict``,
``experiment`` and ``make_cohort`` are modules with a ``main``: ``python -m mslesion.train --help``
(run from ``examples/ms_lesion``) is ``python examples/ms_lesion/train.py --help``.
"""
