"""ddp-train: train timm image classifiers on WebDataset shards with DDP or DeepSpeed."""
from setuptools import find_packages, setup

setup(
    name="ddp-train",
    version="0.1.0",
    description="Train timm image classifiers on WebDataset shards across many GPUs and many days.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["ddp_train", "ddp_train.*"]),
    # ddp_train/bundled/{configs,slurm} are symlinks to the top-level folders (one copy in git);
    # building a wheel copies the files they point at. slurm/cluster.sh is test infrastructure.
    package_data={"ddp_train.bundled": ["configs/*.yaml", "configs/sweeps/*.yaml",
                                        "slurm/train.sbatch",
                                        "slurm/train_multinode.sbatch"]},
    install_requires=[
        # torch/torchvision are pinned by the user's platform (CUDA build); we only set a floor.
        "torch>=2.1",
        "torchvision>=0.16",
        "timm>=1.0",
        "webdataset>=0.2.86",
        "braceexpand>=0.1.7",  # ddp-shards index --split 'train-{000000..000999}.tar'
        "pyyaml>=6",
        "rich>=13",
        "numpy>=1.24",
        "pillow>=10",
        "scikit-learn>=1.3",  # ships the bundled demo data (digits)
    ],
    extras_require={
        "deepspeed": ["deepspeed>=0.14"],
        "accelerate": ["accelerate>=0.30"],
        "plot": ["matplotlib>=3.7", "pandas>=2.0"],
        "tensorboard": ["tensorboard>=2.14"],
        "wandb": ["wandb>=0.16"],
        # ddp-train sweep: Optuna (journal-file storage needs nothing else)
        "sweep": ["optuna>=4.0", "matplotlib>=3.7", "pandas>=2.0"],
        # a PostgreSQL study for multi-node sweeps (--storage postgresql+psycopg://...)
        "postgres": ["psycopg[binary]>=3.1"],
        # optuna-dashboard <storage>: browse a running sweep
        "dashboard": ["optuna-dashboard>=0.15"],
        # ddp-train export --format onnx (torch.onnx's exporter needs onnxscript; onnxruntime
        # checks the exported file against PyTorch)
        "onnx": ["onnx>=1.16", "onnxscript>=0.2", "onnxruntime>=1.18"],
        # deepspeed: tests/test_deepspeed.py runs real DeepSpeed on CPU
        "test": ["pytest>=7", "pytest-timeout>=2", "tensorboard>=2.14", "wandb>=0.16",
                 "matplotlib>=3.7", "pandas>=2.0", "deepspeed>=0.14", "optuna>=4.0",
                 "psycopg[binary]>=3.1", "optuna-dashboard>=0.15", "onnx>=1.16",
                 "onnxscript>=0.2", "onnxruntime>=1.18"],
    },
    entry_points={
        "console_scripts": [
            "ddp-train=ddp_train.__main__:main",
            "ddp-shards=ddp_train.shards.__main__:main",
            "ddp-plot=ddp_train.plot.cli:main",
        ],
    },
)
