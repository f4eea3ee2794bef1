"""setuptools' build backend, less one notice that does not apply to this tree.

vmreplica installs three top-level folders (``producers/``, ``consumers/``, ``schemas/``) as
subpackages of ``vmreplica``, so an editable install needs setuptools' import finder, and
setuptools then prints "Editable installation … be careful with folders in your working directory
with the same name as your package". Here the folder of that name *is* the package, so the
notice only teaches a new user to ignore warnings; every other warning still shows.
"""

from __future__ import annotations

import warnings

from setuptools.build_meta import *  # noqa: F403 — this module is setuptools' backend
from setuptools.warnings import InformationOnly

warnings.filterwarnings("ignore", message="Editable installation", category=InformationOnly)
