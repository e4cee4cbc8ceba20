"""Build megatron-solo and its C++ core (megatron_solo._C: patchify, token layout, the shard packer)."""

from glob import glob

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

ext = Pybind11Extension(
    "megatron_solo._C",
    sorted(glob("csrc/*.cpp")),
    include_dirs=["csrc"],
    cxx_std=17,
    # -ffp-contract=off: the resize coefficients must round exactly as Pillow's C code does (no fused multiply-add).
    extra_compile_args=["-O3", "-ffp-contract=off"],
    extra_link_args=["-pthread"],
)

DEMO_EXTRAS = ["matplotlib", "tensorboard", "transformers>=4.44", "safetensors"]

setup(
    name="megatron-solo",
    version="0.1.0",
    description="Pre-train SOLO-style vision-language models (one transformer, raw patches) on Megatron-Core",
    packages=find_packages(include=["megatron_solo", "megatron_solo.*", "tools", "tools.*"]),
    package_data={"megatron_solo": ["demo_data/*", "demo_data/**/*", "convert/hf_remote/*.py"]},
    ext_modules=[ext],
    cmdclass={"build_ext": build_ext},
    python_requires=">=3.10",
    install_requires=[
        # torch: bring your own (CUDA build on GPU / NGC); the CPU dev setup installs torch==2.13.0 first.
        "torch>=2.4",
        # Tested: 0.16.1 (CI step 1, Python 3.11 wheel) and 0.19.2 (CI step 2, from source).
        "megatron-core>=0.16.1,<0.20",
        "psutil",  # undeclared runtime dependency of megatron.core.dist_checkpointing
        "numpy",
        "sentencepiece>=0.2",
        "pillow>=10",
        "pybind11>=2.10",
        "tqdm",
        "zstandard",
        "pyarrow>=14",  # parquet / arrow / datasets.save_to_disk sources (read in record batches)
        "protobuf",  # sentencepiece_model_pb2: extending the tokenizer's ModelProto
    ],
    extras_require={
        # demo: the bundled demo data (matplotlib ships its photo), TensorBoard logs, HF export / generate
        "demo": DEMO_EXTRAS,
        # eval: `python -m megatron_solo.evaluate` (CIDEr from pycocoevalcap; its PTB tokenizer runs on java).
        # lmms-eval is NOT an extra: its declared dependencies break a CPU-torch env (docs/evaluation.md);
        # scripts/install_lmms_eval.sh installs it.
        "eval": [*DEMO_EXTRAS, "pycocoevalcap"],
        # xxhash: the reference for our XXH64; datasets / webdataset: they write the source formats the tests read
        # wandb: the offline-run test of --wandb-project; ray: `build --ray` (pip install ray took 23-35 s here)
        "test": [
            *DEMO_EXTRAS, "pytest>=8", "ruff", "xxhash", "pycocoevalcap", "datasets", "webdataset", "wandb", "ray>=2.9",
        ],  # fmt: skip
        "wandb": ["wandb"],  # --wandb-project (Weights & Biases logging)
        "ray": ["ray>=2.9"],  # build --ray (partitions as Ray tasks)
        "gpu": ["transformer-engine[pytorch]"],
    },
    entry_points={
        "console_scripts": [
            "solo-preprocess=megatron_solo.preprocess.cli:main",
            "solo-extend-tokenizer=megatron_solo.format.tokens:main",
        ],
        # lmms-eval finds its plug-in models here: `python -m lmms_eval --model solo --model_args pretrained=DIR`
        "lmms_eval.models": ["solo=megatron_solo.eval.lmms_eval_solo:manifest"],
    },
)
