"""`palr data download NAME`: fetch a data set from its original source and check sha256 sums.

Checksums are pinned for the extracted files whose sha256 is documented (GroupLens releases);
for files without a pinned sum the computed sha256 is printed so that a user can record it.
Offline, the download fails at once with the list of files to place and where.
"""

from __future__ import annotations

import io
import logging
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from palr.core.errors import PalrError
from palr.core.io import sha256_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Source:
    url: str
    files: dict[str, str | None]  # file name in the data set folder -> pinned sha256 (None: not pinned)
    zip_prefix: str | None = None  # folder inside the zip archive
    homepage: str = ""
    notes: list[str] = field(default_factory=list)


GROUPLENS = "https://files.grouplens.org/datasets/movielens"
UCSD = "http://snap.stanford.edu/data/amazon/productGraph/categoryFiles"

SOURCES: dict[str, list[Source]] = {
    "ml-100k": [Source(f"{GROUPLENS}/ml-100k.zip", {
        "u.data": "06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490",
        "u.item": "553841ebc7de3a0fd0d6b62a204ea30c1e651aacfb2814c7a6584ac52f2c5701",
        "u.user": "f120e114da2e8cf314fd28f99417c94ae9ddf1cb6db8ce0e4b5995d40e90e62c",
        "u.genre": "9757e0d3e6b298159a80dd48eaf938114690e911e39af97a76949ef1663610bb",
        "README": "4883b8cf340ed0059971b33f56ad3adc88a40792108ebca3d24aafc4c82e8b52",
    }, "ml-100k/", "https://grouplens.org/datasets/movielens/100k/")],
    "ml-1m": [Source(f"{GROUPLENS}/ml-1m.zip", {
        "ratings.dat": None,
        "movies.dat": "0140fc2356357c1a851d0f52e893a1e4d3696df632c4141cea8d5bc3d621f0b9",
        "users.dat": "1dc3a95300cb19f7c10e027daf29b8cdf1d908dab65b5edfb45950aa389a10a3",
        "README": "2d5ddce86ccbd247207456165827b4b9ddf27282bca93807d4c763e28414f133",
    }, "ml-1m/", "https://grouplens.org/datasets/movielens/1m/")],
    "ml-latest-small": [Source(f"{GROUPLENS}/ml-latest-small.zip", {
        "ratings.csv": "aa289ca83157595d0df6aea1be6a4ded676ddc4385472e8313a8ed9805352646",
        "movies.csv": "5a5f32dd9bb3797b8e728a1b98958789d2b13f294a69fdfbc5727f8a9611aa07",
        "README.txt": None,
    }, "ml-latest-small/", "https://grouplens.org/datasets/movielens/latest/",
        ["GroupLens updates ml-latest-small from time to time; the pinned sums are those of the 2018-09-26 release."])],
}


def amazon_sources(category: str) -> list[Source]:
    return [Source(f"{UCSD}/reviews_{category}_5.json.gz", {f"reviews_{category}_5.json.gz": None}),
            Source(f"{UCSD}/meta_{category}.json.gz", {f"meta_{category}.json.gz": None})]


def sources_for(name: str) -> list[Source]:
    if name in SOURCES:
        return SOURCES[name]
    if name.startswith("amazon-") and len(name) > 7:
        category = "_".join(w.capitalize() for w in name[7:].replace("_", "-").split("-"))
        return amazon_sources(category)
    raise PalrError(f"no download source for {name!r}; known: {', '.join([*SOURCES, 'amazon-<category>'])}")


def _fetch(url: str, timeout: float) -> bytes:
    import httpx

    try:
        with httpx.stream("GET", url, timeout=timeout, follow_redirects=True) as r:
            r.raise_for_status()
            return r.read()
    except (httpx.HTTPError, OSError) as e:
        raise ConnectionError(f"{type(e).__name__}: {e}") from None


def download(name: str, data_dir: Path, timeout: float = 10.0) -> dict[str, str]:
    """Download ``name`` into ``data_dir/name``; returns {file: sha256}. Raises PalrError offline."""
    target = data_dir / name
    results: dict[str, str] = {}
    for src in sources_for(name):
        try:
            payload = _fetch(src.url, timeout)
        except ConnectionError as e:
            files = ", ".join(sorted({f for s in sources_for(name) for f in s.files}))
            raise PalrError(
                f"cannot download {name} from {src.url} ({e}). This machine seems to be offline. "
                f"Download it elsewhere and place these files in {target}/: {files}"
                + (f" (from {src.homepage})" if src.homepage else "")) from None
        target.mkdir(parents=True, exist_ok=True)
        if src.url.endswith(".zip"):
            with zipfile.ZipFile(io.BytesIO(payload)) as zf:
                for fname in src.files:
                    member = f"{src.zip_prefix or ''}{fname}"
                    (target / fname).write_bytes(zf.read(member))
        else:
            (target / next(iter(src.files))).write_bytes(payload)
        for fname, want in src.files.items():
            got = sha256_file(target / fname)
            if want is not None and got != want:
                (target / fname).unlink()
                raise PalrError(f"{target / fname}: sha256 {got} does not match the pinned {want}; file removed")
            results[fname] = got
            log.info("%s %s sha256 %s", fname, "verified" if want else "(not pinned)", got)
    return results
