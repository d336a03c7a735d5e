"""Distribution for the LoFTR structure-from-motion and localization toolbox."""

from setuptools import setup

setup(
    name="loftr-sfm",
    version="0.1.0",
    description="hloc-style Structure-from-Motion and visual localization with the LoFTR matcher",
    python_requires=">=3.10",
    packages=[
        "matchers",
        "matchers.loftr",
        "recipes.training",
        "core",
        "pipeline",
        "localization",
        "datasets",
        "recipes",
    ],
    package_data={"matchers.loftr": ["weights/*.ckpt", "weights/*.md"]},
    install_requires=[
        # torch is installed first, explicitly (see Makefile / README), so a range here installs nothing more.
        "torch>=2.1",
        "kornia>=0.7",
        "numpy",
        "scipy",
        "opencv-python-headless>=4.7",
        "pycolmap>=4.0",
        "h5py",
        "matplotlib",
        "plotly",  # the interactive model viewer (reconstruction.html, plotly.js inlined)
        "tqdm",
        "pillow",
        "pandas",
        # LoFTR as ONNX (python -m matchers.loftr.export_onnx) and run by onnxruntime (--weights model.onnx)
        "onnx>=1.15",
        "onnxruntime>=1.17",
    ],
    extras_require={
        "test": ["pytest", "ruff", "import-linter"],
        "train": ["scikit-image"],
        # --distributed ray: matching and track refinement over Ray actors (one per GPU, or per 2 CPU cores)
        "distributed": ["ray>=2.9"],
    },
)
