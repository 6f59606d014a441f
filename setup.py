from setuptools import find_packages, setup

setup(
    name="structprune",
    version="0.1.0",
    description="Dependency-graph structural pruning and low-rank compression of causal language models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["depgraph*", "pruners*", "recover*", "evaluation*", "modelio*", "corpora*"]),
    package_data={"evaluation.tasks": ["*.yaml"]},
    py_modules=["hf_prune", "post_training"],
    install_requires=[
        "torch>=2.3,<2.15",
        "transformers>=5.0,<6",
        "safetensors>=0.4",
        "accelerate>=1.0",
        "datasets>=3.0",
        "lm-eval>=0.4.8,<0.5",
        "peft>=0.17",
        "networkx>=3.0",
        "gguf>=0.10",
        "matplotlib>=3.7",
        "tqdm>=4.60",
        "numpy>=1.24",
    ],
    extras_require={
        "test": ["pytest>=7"],
        # llama.cpp through its Python binding, to run and measure exported GGUF files (a source build: minutes)
        "deploy": ["llama-cpp-python>=0.3.36,<0.4"],
    },
    entry_points={
        "console_scripts": [
            "structprune-prune = hf_prune:cli",
            "structprune-recover = post_training:cli",
            "structprune-eval = evaluation.__main__:cli",
        ],
    },
)
