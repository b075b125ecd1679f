"""Data: synthetic sets, conversion to TFRecord shards, the tf.data pipeline and augmentation."""
