"""dsran_jax: a zoo of image-text matching models (DSRAN, SCAN, SGRAF, KIDRR, MLASM,
BSSAN) in JAX/Flax, trained, evaluated, converted and searched the same way."""
import os

# TensorFlow only feeds data here (tf.data): its C++ startup notices are noise, and its
# oneDNN math kernels are unused (off, TF also stops announcing them). Set before any
# module of the package imports TensorFlow; a user's own setting wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

__version__ = "0.1.0"
