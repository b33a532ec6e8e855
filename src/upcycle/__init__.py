"""upcycle: turn dense pretrained language models into sparse Mixture-of-Experts models."""

__version__ = "0.1.0"
