"""Offline training of word-level recurrent language models (PyTorch): data, cells, training,
evaluation, the Kneser-Ney baseline and ONNX export into the model repository."""
