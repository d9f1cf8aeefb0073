"""Datasets, samplers and augmentation for MCL.

Training data is a pure function of (seed, epoch, batch index): samplers and
augmentation parameters are drawn from generators seeded with those numbers, so
runs resume bitwise-exactly and the PIL path and the fast tensor path agree.
"""
