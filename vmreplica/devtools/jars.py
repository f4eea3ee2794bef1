"""The Kafka jars the local cluster runs: resolved once with Maven into a cache outside the tree.

``deploy/kafka/pom.xml`` pins Kafka 4.x and its logging binding; Maven copies the runtime jars
from Maven Central into ``$VMREPLICA_CACHE`` (default ``~/.cache/vmreplica``), where every
checkout shares them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Final

from vmreplica.errors import PrerequisiteMissingError

_ENV_HINT: Final = (
    "Or point vmreplica at an existing Kafka cluster instead: "
    "export VMREPLICA_BOOTSTRAP_SERVERS=host:9092"
)


def deploy_dir() -> Path:
    """The ``deploy/`` folder of this checkout (the pom and logging config live there)."""
    configured = os.environ.get("VMREPLICA_DEPLOY_DIR")
    path = Path(configured) if configured else Path(__file__).resolve().parents[2] / "deploy"
    if not (path / "kafka" / "pom.xml").is_file():
        raise PrerequisiteMissingError(
            f"cannot find deploy/kafka/pom.xml under {path}. Run vmreplica from its source "
            f"checkout or set VMREPLICA_DEPLOY_DIR to the checkout's deploy/ folder. {_ENV_HINT}"
        )
    return path


def cache_dir() -> Path:
    """Where resolved jars live: outside the repository, shared by every checkout."""
    configured = os.environ.get("VMREPLICA_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "vmreplica"


def home_dir() -> Path:
    """``$VMREPLICA_HOME`` (default ``~/.vmreplica``): state, logs and pid files."""
    configured = os.environ.get("VMREPLICA_HOME")
    return Path(configured) if configured else Path.home() / ".vmreplica"


_DEBIAN_PACKAGE: Final = {"java": "openjdk-17-jre-headless", "mvn": "maven"}


def require_program(program: str, what: str) -> str:
    found = shutil.which(program)
    if found is None:
        raise PrerequisiteMissingError(
            f"{program} is not on PATH; vmreplica needs {what} to run a local Kafka broker. "
            f"Install it (Debian: apt-get install {_DEBIAN_PACKAGE[program]}). {_ENV_HINT}"
        )
    return found


def _pom_version(pom: Path) -> str:
    text = pom.read_text()
    start = text.index("<kafka.version>") + len("<kafka.version>")
    return text[start : text.index("</kafka.version>", start)]


def resolve_kafka() -> Path:
    """Return the folder holding the Kafka jars, resolving them with Maven on first use.

    The cache folder is named after the pom's Kafka version and a digest of the whole pom, so any
    edit to the pom (another logging binding, say) resolves afresh instead of reusing old jars.
    Two processes resolving at once each stage their own copy; the first rename wins.

    :raises PrerequisiteMissingError: Java or Maven is missing, or Maven Central is unreachable.
    """
    require_program("java", "Java 17 or newer")
    pom = deploy_dir() / "kafka" / "pom.xml"
    digest = hashlib.sha256(pom.read_bytes()).hexdigest()[:12]
    libs = cache_dir() / f"kafka-{_pom_version(pom)}-{digest}" / "libs"
    complete = libs / ".complete"
    if complete.is_file():
        return libs
    mvn = require_program("mvn", "Maven")
    libs.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="libs.partial-", dir=libs.parent))
    try:
        result = subprocess.run(
            [
                mvn,
                "-q",
                "-B",
                "-f",
                str(pom),
                "dependency:copy-dependencies",
                f"-DoutputDirectory={staging}",
                "-DincludeScope=runtime",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0 or not any(staging.glob("kafka_2.13-*.jar")):
            tail = (result.stdout + result.stderr).strip().splitlines()[-15:]
            raise PrerequisiteMissingError(
                "Maven could not resolve the Kafka jars from Maven Central "
                f"(exit {result.returncode}):\n  " + "\n  ".join(tail) + f"\n{_ENV_HINT}"
            )
        (staging / ".complete").write_text(_pom_version(pom))
        if not complete.is_file():
            shutil.rmtree(libs, ignore_errors=True)
            try:
                staging.rename(libs)
            except OSError:
                if not complete.is_file():
                    raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return libs
