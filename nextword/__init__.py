"""Shared, torch-free core of nextword: the tokenizer, the vocabulary and the model artifact format.

Training writes artifacts with it and the service reads them with it, so the two can never
disagree about what a word is or what a model directory holds.
"""
