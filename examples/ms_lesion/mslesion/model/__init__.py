"""The network and its loss: a 3-D U-Net with RSA or non-local blocks, the weighted cross-entropy."""
