"""Evaluation: segmentation metrics, paired statistics, the experiment's report and the figures."""
