"""Evaluation: the paper's segmentation protocol, fixed-threshold metrics, zones and text metrics."""
