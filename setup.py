from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
readme = here / "README.md"

setup(
    name="torch_rlprune",
    version="0.1.0",
    description="Reinforcement-learning pruning policies on top of torch.nn.utils.prune",
    long_description=readme.read_text(encoding="utf-8") if readme.exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(exclude=["tests", "tests.*", "benchmarks", "benchmarks.*", "examples", "examples.*"]),
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.1,<3",
        "torchvision>=0.16",
        "torch-pruning>=1.4,<2",
        "timm>=0.9",
        "numpy>=1.22",
        "tqdm>=4.60",
        # report.md's plots (PNG, Agg backend): the charts people look at are not worth re-implementing.
        "matplotlib>=3.5",
    ],
    # the console script's entry point sits outside the package: it sets OpenMP defaults before torch loads
    py_modules=["torch_rlprune_console"],
    entry_points={"console_scripts": ["rlprune=torch_rlprune_console:main"]},
    extras_require={
        # transformers in the tests: BERT, GPT-2, T5, ViT and Whisper built from small configs (no download)
        "test": ["pytest>=7", "pytest-xdist>=3", "hypothesis>=6", "gymnasium>=0.29", "transformers>=4.40",
                 "onnx>=1.16", "onnxruntime>=1.18", "onnxscript>=0.1"],
        # export to a deployment runtime (torch_rlprune.export): ONNX files run and checked in onnxruntime
        "deploy": ["onnx>=1.16", "onnxruntime>=1.18", "onnxscript>=0.1"],
        # ExecuTorch .pte files (export(format="pte")): heavy (coremltools, scipy, pandas...), so on its own
        "executorch": ["executorch>=1.5"],
        "gym": ["gymnasium>=0.29"],
        "transformers": ["transformers>=4.40"],
    },
)
