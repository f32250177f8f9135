"""The package version (one place: `hf_distill.__version__`, model cards, recipes, `hf-distill --version`)."""

__version__ = "0.1.0"
