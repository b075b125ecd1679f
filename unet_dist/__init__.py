"""unet_dist: U-Net segmentation training on TensorFlow, from one CPU to a SLURM cluster."""

import os

# TensorFlow's C++ INFO lines (CPU features, ...) drown our output; warnings still show. TF 2.21
# still prints its "oneDNN custom operations are on" notice at import, twice, with absl's banner
# (tensorflow/tensorflow#100442): it is logged before the level applies, and only
# TF_ENABLE_ONEDNN_OPTS=0, which turns oneDNN off, silences it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

__version__ = "0.1.0"
