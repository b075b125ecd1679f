"""unet_dist: U-Net segmentation training on TensorFlow, from one CPU to a SLURM cluster."""

import os

from unet_dist import tfquiet

# TensorFlow's C++ INFO lines (CPU features, oneDNN, ...) drown our output; warnings still show.
# TF 2.21 logs some at import before it applies the level: tfquiet applies it to them.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
tfquiet.install()

__version__ = "0.1.0"
