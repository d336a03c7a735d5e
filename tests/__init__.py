"""The test suite: ``python -m pytest tests`` from anywhere (a package, so its modules import each other as
``tests.*`` whatever the working directory)."""
