"""unet_dist: U-Net segmentation training on TensorFlow, from one CPU to a SLURM cluster."""

import os

# TensorFlow's C++ INFO lines (oneDNN, CPU features) drown our output; warnings still show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

__version__ = "0.1.0"
