"""mmdit: the repository root is the `mmdit` package (producer/, consumer/, model/, ...)."""

from setuptools import setup

SUBPACKAGES = ["utils", "config", "model", "parallel", "cache", "producer", "producer.synth", "producer.annotate",
               "dataservice", "consumer", "consumer.text_eval", "launch"]

setup(
    name="mmdit",
    version="0.1.0",
    description="Disaggregated-data Megatron training for Qwen-Image-class MMDiT models",
    python_requires=">=3.10",
    package_dir={"mmdit": ".", **{f"mmdit.{p}": p.replace(".", "/") for p in SUBPACKAGES}},
    packages=["mmdit", *[f"mmdit.{p}" for p in SUBPACKAGES]],
    include_package_data=True,
    package_data={"mmdit": ["conf/*.yaml", "conf/*/*.yaml"],
                  "mmdit.consumer.text_eval": ["*.jsonl"]},  # the built-in text-rendering prompt set
    # torch is a range, never a pin: a GPU cluster brings its own CUDA build and installing
    # mmdit must not replace it. The CPU quickstart pins torch==2.13.0 before this (Makefile).
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16",
        "transformers>=4.56",
        "tokenizers>=0.20",
        "diffusers>=0.35",
        "hydra-core>=1.3",
        "omegaconf>=2.3",
        "webdataset>=0.2.100",
        "safetensors>=0.4",
        "pyarrow>=14",
        "pyyaml>=6",
        "tensorboard>=2.14",
        "prometheus_client>=0.20",
        "pillow>=10",
        "numpy>=1.24",
        "tqdm>=4.60",
        "jsonschema>=4.18",
        # `mmdit eval`'s OCR engine: PP-OCR Chinese/English detection and recognition models ship
        # in the wheel (offline), run by onnxruntime on the CPU
        "rapidocr>=3",
        "onnxruntime>=1.16",
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]>=2.0"],
        # peft: diffusers' load_lora_weights needs it (tests load mmdit's exported LoRA with it)
        "dev": ["pytest>=8", "pytest-timeout>=2.2", "import-linter>=2.1", "hypothesis>=6", "peft>=0.17"],
    },
    entry_points={"console_scripts": ["mmdit=mmdit.launch.cli:main"]},
)
