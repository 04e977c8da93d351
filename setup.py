"""sgt_jax: Semantic Generative Tuning of unified multimodal models in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="sgt_jax",
    version="0.1.0",
    description="Semantic Generative Tuning (SGT) for discrete-token unified multimodal models, in JAX/Flax.",
    packages=find_packages(include=["sgt_jax", "sgt_jax.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10.2,<0.13",
        "flax>=0.12,<0.13",
        "optax>=0.2.5,<0.3",
        "orbax-checkpoint>=0.12,<0.13",
        "grain>=0.2.18,<0.3",
        "tensorflow-datasets>=4.9.10,<4.10",
        "array-record>=0.8,<0.9",
        "transformers>=5.0,<6",
        "tokenizers>=0.22,<1",
        "ml-collections>=1.1,<2",
        "clu==0.0.12",
        "absl-py>=2.1,<3",
        "tensorflow-cpu>=2.20,<2.22",
        "tensorboard>=2.20,<2.22",
        # TFDS's dataset_builder imports it (lazily, when a builder resolves its files) without
        # declaring it (tensorflow-datasets 4.9.10): building Shapes World needs it.
        "importlib_resources>=6",
        "numpy>=2.0,<3",
        "scipy>=1.13,<2",
        "pillow>=11,<13",
        "pyarrow>=17,<27",  # LLaVA-OneVision and CV-Bench parquet files
        "matplotlib>=3.9,<4",
        "safetensors>=0.5,<1",
    ],
    extras_require={
        # jax's own `tpu` extra pins the libtpu built for that jax release (jax 0.10.2 -> libtpu
        # 0.0.42.*), so the TPU compiler always matches the installed jax. The test extra takes it
        # too (a 213 MB wheel, ~1 min to install) so tests/test_aot.py compiles for TPU in CI
        # instead of skipping; on a CPU-only host libtpu only adds the compile-only TPU devices.
        "test": ["pytest>=8,<10", "pytest-xdist>=3.6,<4", "torch==2.13.0", "ruff>=0.6", "jax[tpu]>=0.10.2,<0.13"],
        # tools/convert_checkpoint.py --janus on the original DeepSeek layout (pytorch_model.bin)
        "convert": ["torch>=2.4,<3"],
        "tpu": ["jax[tpu]>=0.10.2,<0.13"],
    },
)
