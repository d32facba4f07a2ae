"""Packaging hook: wheels carry the repository's calibration_data/ inside the package.

The folder stays at the top of the repository (where people look for it); a built wheel places a
copy at quantkit/calibration_data/, which quantkit.data.locations finds when installed.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithData(build_py):
    def run(self):
        super().run()
        source = Path(__file__).parent / "calibration_data"
        if source.is_dir() and not self.editable_mode:
            target = Path(self.build_lib) / "quantkit" / "calibration_data"
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(source, target)


setup(cmdclass={"build_py": BuildWithData})
