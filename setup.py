from setuptools import find_packages, setup

setup(
    name="cm_diffusers",
    version="0.1.0",
    description="Consistency models (Song et al. 2023) as first-class diffusers citizens: one-step sampling, "
    "zero-shot editing, consistency distillation and training with Accelerate.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["cm_diffusers", "cm_diffusers.*"]),
    package_data={"cm_diffusers": ["pretrained/**/*", "templates/*", "serving/static/*", "serving/static/samples/*"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.1,<3",
        "diffusers>=0.40",
        "accelerate>=1.0",
        "huggingface-hub>=0.34",
        "datasets>=3.0",
        "safetensors>=0.4",
        "numpy>=1.24",
        "pillow>=10",
        "tqdm>=4.60",
    ],
    extras_require={
        "eval": ["scipy>=1.10", "matplotlib>=3.7"],
        "train": ["tensorboard>=2.14"],
        # The HTTP API (`cm-diffusers serve`): Ray Serve brings FastAPI, uvicorn, pydantic and prometheus_client.
        "serve": ["ray[serve]==2.60.0", "python-multipart>=0.0.9", "requests>=2.28"],
        # Latent consistency distillation (`--mode lcd`): text encoders and tokenizers, LoRA adapters (LCM-LoRA).
        "lcd": ["transformers>=4.41.2", "peft>=0.17.0"],
        # schemathesis fuzzes the HTTP API from its OpenAPI schema; psutil reads the server's listening sockets.
        "test": ["pytest>=8", "pytest-timeout>=2.2", "scipy>=1.10", "matplotlib>=3.7", "tensorboard>=2.14", "ruff",
                 "selenium>=4.20", "schemathesis==4.32.5", "psutil>=5.9"],
    },
    entry_points={"console_scripts": ["cm-diffusers=cm_diffusers.cli:main"]},
)
