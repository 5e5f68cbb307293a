from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="mtl-keras",
    version="0.1.0",
    description="Many-task learning on Keras 3: Task Routing, Selective Sharing, loss weighting, serving.",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    packages=find_packages(include=["mtl_keras", "mtl_keras.*"]),
    # What the pins need: Keras 3.15, NumPy 2.4, scikit-learn 1.9, SciPy 1.17, Matplotlib 3.11 and
    # Pillow 13 require Python >= 3.11; TensorFlow 2.21 ships wheels for 3.10-3.13 only.
    python_requires=">=3.11,<3.14",
    install_requires=[
        "tensorflow>=2.21,<2.22",
        "keras>=3.15,<3.16",
        "tensorflow-datasets>=4.9.10",
        "keras-tuner>=1.4.8",
        "tensorboard>=2.21",
        "scikit-learn>=1.9",
        "numpy>=2.0",
        "matplotlib>=3.9",
        "pillow>=10",
    ],
)
