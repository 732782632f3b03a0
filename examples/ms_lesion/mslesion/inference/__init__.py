"""Inference: sliding-window prediction, lesions as clinicians read them, the onnxruntime engine."""
