"""Test set-up: four logical CPU devices, made before TensorFlow initialises."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tfpipe  # noqa: E402

tfpipe.configure_cpu_devices(4)
