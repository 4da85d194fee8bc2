"""Test sets and parallel data: bundled WMT22 sets, ALMA's JSON files, course-project JSONL, plain text.

Formats read by :func:`load_testset`:

- ``wmt22:de-en`` (and ru, zh <-> en): the WMT22 test sets bundled under ``data/wmt22``.
- ``flores200:deu_Latn-yor_Latn`` (devtest) and ``flores200-dev:...`` (dev): FLORES-200 from a folder the user
  has (``flores_dir``), in the dataset's own layout (``dev/deu_Latn.dev``, ``devtest/deu_Latn.devtest``) or with
  the files side by side; either side may also be a short code (``de``), matched to the folder's files.
- ALMA's files: a JSON array or JSON lines of ``{"translation": {"de": ..., "en": ...}}``; the
  direction comes from ``lang_pair`` or from a ``xx-yy`` in the file name.
- Course-project JSONL: ``{"langs": "en-de", "src": ..., "ref": ...}`` (``mt``/``tgt`` there are system
  outputs, never references).
- Plain text: a ``.tsv`` of ``source<TAB>reference`` lines; the direction comes from ``lang_pair`` or from a
  ``xx-yy`` in the file name.

:func:`load_testsets` reads several at once: ``wmt22:all`` (every bundled direction) or a comma-separated list
of the above.
"""
from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass
from pathlib import Path

from almak.errors import AlmakError
from almak.modeling.text.languages import lang_tag, language_name, parse_lang_pair

DATA_DIR = Path(__file__).resolve().parents[2] / "data"
WMT22_PAIRS = ("de-en", "en-de", "ru-en", "en-ru", "zh-en", "en-zh")
# ALMA's human-written parallel data (data/alma, gzip-compressed JSON lines): every xx-en file serves both
# directions. is-en has no valid split in ALMA's release.
ALMA_LANGS = ("cs", "de", "is", "ru", "zh")
ALMA_DIRECTIONS = tuple(d for xx in ALMA_LANGS for d in (f"{xx}-en", f"en-{xx}"))


@dataclass
class TestSet:
    """Sources and references of one direction. ``name`` is how reports refer to it."""

    __test__ = False  # not a pytest class

    name: str
    src: str
    tgt: str
    sources: list[str]
    references: list[str]

    def __post_init__(self):
        if len(self.sources) != len(self.references):
            raise AlmakError(
                f"{self.name}: {len(self.sources)} sources but {len(self.references)} references"
            )
        if not self.sources:
            raise AlmakError(f"{self.name}: the test set is empty")

    @property
    def lang_pair(self) -> str:
        return f"{self.src}-{self.tgt}"

    def head(self, limit: int | None) -> "TestSet":
        if limit is None:
            return self
        if limit <= 0:
            raise AlmakError(f"--limit must be positive, got {limit}")
        return TestSet(self.name, self.src, self.tgt, self.sources[:limit], self.references[:limit])


def decode_text(raw: bytes, where: str) -> str:
    """``raw`` as UTF-8 (a leading BOM dropped), or an AlmakError naming the line of the first bad byte."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise AlmakError(f"{where} is not UTF-8 text: line {line} has the byte 0x{raw[e.start]:02x}; convert it "
                         "(iconv -t UTF-8)") from None


def split_lines(text: str, where: str) -> list[str]:
    """Lines of ``text`` without their newlines; text with no line that is not blank is an AlmakError."""
    if not text:
        raise AlmakError(f"{where} is empty")
    if not text.strip():
        raise AlmakError(f"{where} holds only empty lines")
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def read_lines(path: str | Path, what: str = "file") -> list[str]:
    """Lines of a UTF-8 text file without their newlines; a missing, empty or non-UTF-8 file (or one of empty
    lines only) is an AlmakError."""
    path = Path(path)
    where = f"{what} {str(path)!r}"
    if not path.is_file():
        raise AlmakError(f"{where} " + ("is not a regular file" if path.exists() else "does not exist"))
    return split_lines(decode_text(path.read_bytes(), where), where)


def read_json_records(path: Path) -> list[dict]:
    """A JSON array or JSON lines file (gzip-compressed when named ``*.gz``) as a list of objects."""
    raw = path.read_bytes()
    where = f"test set {str(path)!r}"
    try:
        text = decode_text(gzip.decompress(raw) if path.suffix == ".gz" else raw, where)
    except (OSError, EOFError) as e:  # gzip's errors for a file that is not, or not all, gzip
        raise AlmakError(f"{where} is not a complete gzip file ({e})") from None
    if not text.strip():
        raise AlmakError(f"{where} is empty")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise AlmakError(f"{where} is not valid JSON: {e}") from None
    else:
        records = []
        for n, line in enumerate(text.split("\n"), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise AlmakError(f"{where}: line {n} is not JSON ({e.msg} at column {e.colno})") from None
    bad = next((i for i, r in enumerate(records) if not isinstance(r, dict)), None)
    if bad is not None:
        raise AlmakError(f"{where}: record {bad + 1} is not a JSON object")
    return records


def _pair_from_name(path: Path) -> str | None:
    m = re.search(r"(?<![a-z])([a-z]{2})-([a-z]{2})(?![a-z])", path.name)
    return f"{m.group(1)}-{m.group(2)}" if m else None


FLORES_SPLITS = {"flores200": "devtest", "flores200-dev": "dev"}


def load_flores200(spec: str, folder: str | Path | None) -> TestSet:
    """``flores200:deu_Latn-yor_Latn`` (devtest) or ``flores200-dev:...`` read from ``folder``."""
    kind, pair = spec.split(":", 1)
    split = FLORES_SPLITS[kind]
    if folder is None:
        raise AlmakError(f"{spec}: FLORES-200 is not bundled; pass the folder of the dataset (with dev/ and devtest/,"
                         " as flores200_dataset unpacks) with --flores-dir or ALMAK_FLORES200")
    folder = Path(folder)
    if not folder.is_dir():
        raise AlmakError(f"FLORES-200 folder {str(folder)!r} does not exist")
    files = {p.name[: -len(split) - 1]: p for d in (folder / split, folder) if d.is_dir()
             for p in sorted(d.glob(f"*.{split}"))}
    if not files:
        raise AlmakError(f"{str(folder)!r} holds no FLORES-200 {split} files (looked for {split}/*.{split} and "
                         f"*.{split})")
    src, tgt = parse_lang_pair(pair)
    sides = pair.split("-") if pair.count("-") == 1 else []
    paths = []
    for i, tag in enumerate((src, tgt)):
        written = sides[i] if sides else tag
        match = files.get(written) or next((p for code, p in files.items() if _tag_or_none(code) == tag), None)
        if match is None:
            raise AlmakError(f"{str(folder)!r} has no {split} file for {written!r} ({language_name(tag)}); it has "
                             f"{', '.join(sorted(files))}")
        paths.append(match)
    sources, references = (read_lines(p, "FLORES-200 file") for p in paths)
    if len(sources) != len(references):
        raise AlmakError(f"{paths[0].name} has {len(sources)} lines but {paths[1].name} has {len(references)}")
    return TestSet(spec, src, tgt, sources, references)


def _tag_or_none(code: str) -> str | None:
    try:
        return lang_tag(code)
    except AlmakError:
        return None


def load_testset(spec: str, lang_pair: str | None = None, flores_dir: str | Path | None = None) -> TestSet:
    """Load ``wmt22:de-en``, ``flores200:deu_Latn-yor_Latn`` (from ``flores_dir``) or a file (see the module
    docstring for formats)."""
    if spec.split(":", 1)[0] in FLORES_SPLITS and ":" in spec:
        return load_flores200(spec, flores_dir)
    if spec.startswith("wmt22:"):
        pair = spec.split(":", 1)[1]
        if pair not in WMT22_PAIRS:
            raise AlmakError(f"no bundled WMT22 set {pair!r}; bundled: {', '.join(WMT22_PAIRS)}")
        ts = load_testset(str(DATA_DIR / "wmt22" / f"test.{pair}.json"), pair)
        ts.name = spec
        return ts

    path = Path(spec)
    if not path.is_file():
        raise AlmakError(f"test set {spec!r} is neither a bundled set (wmt22:de-en, ...) nor an existing file")
    if path.suffix == ".tsv":
        pair = lang_pair or _pair_from_name(path)
        if pair is None:
            raise AlmakError(f"{spec}: a .tsv test set needs --lang-pair (or a direction in its name: test.de-en.tsv)")
        src, tgt = parse_lang_pair(pair)
        rows = [line.split("\t") for line in read_lines(path, "test set")]
        bad = [i + 1 for i, r in enumerate(rows) if len(r) != 2]
        if bad:
            raise AlmakError(f"{spec}: line {bad[0]} does not have exactly two tab-separated fields")
        return TestSet(spec, src, tgt, [r[0] for r in rows], [r[1] for r in rows])

    records = read_json_records(path)
    if records and "translation" in records[0]:
        pair = lang_pair or _pair_from_name(path)
        if pair is None:
            raise AlmakError(f"{spec}: cannot tell the direction from the file name; pass --lang-pair")
        src, tgt = parse_lang_pair(pair)
        try:
            sources = [r["translation"][src] for r in records]
            refs = [r["translation"][tgt] for r in records]
        except KeyError as e:
            raise AlmakError(f"{spec}: a record has no {e.args[0]!r} field") from None
        return TestSet(spec, src, tgt, sources, refs)
    if records and "src" in records[0] and "langs" in records[0]:
        pairs = sorted({r["langs"] for r in records})
        if lang_pair is None and len(pairs) > 1:
            raise AlmakError(f"{spec} holds several directions ({', '.join(pairs)}); pick one with --lang-pair")
        pair = lang_pair or pairs[0]
        src, tgt = parse_lang_pair(pair)
        chosen = [r for r in records if r["langs"] == pair]
        if not chosen:
            raise AlmakError(f"{spec} holds no {pair} records (it has {', '.join(pairs)})")
        if any("ref" not in r for r in chosen):
            raise AlmakError(f"{spec}: records without a 'ref' field ('mt' is a system output, not a reference)")
        return TestSet(f"{spec}:{pair}", src, tgt, [r["src"] for r in chosen], [r["ref"] for r in chosen])
    raise AlmakError(
        f"{spec}: unrecognised format (expected ALMA 'translation' records, course-project JSONL with "
        "'langs'/'src'/'ref', or a .tsv of source<TAB>reference)"
    )


def load_testsets(spec: str, lang_pair: str | None = None, flores_dir: str | Path | None = None) -> list[TestSet]:
    """The test sets of ``spec``: ``wmt22:all`` (the six bundled WMT22 directions) or a comma-separated list of what
    :func:`load_testset` reads, each item once. Two items of the same direction are an AlmakError: reports key
    directions by their language pair.

    >>> [ts.lang_pair for ts in load_testsets("wmt22:de-en,wmt22:en-zh")]
    ['de-en', 'en-zh']
    """
    items = [item.strip() for item in spec.split(",")]
    if not all(items):
        raise AlmakError(f"--testset {spec!r} has an empty item")
    items = [i for item in items for i in ([f"wmt22:{p}" for p in WMT22_PAIRS] if item == "wmt22:all" else [item])]
    testsets: dict[str, TestSet] = {}
    for item in items:
        ts = load_testset(item, lang_pair, flores_dir)
        if ts.lang_pair in testsets:
            raise AlmakError(f"--testset names the direction {ts.lang_pair} twice ({testsets[ts.lang_pair].name} and "
                             f"{ts.name}); a run evaluates each direction once")
        testsets[ts.lang_pair] = ts
    return list(testsets.values())


def calibration_pairs(pairs: tuple[str, ...] = ("cs", "de", "is", "ru", "zh")) -> dict[str, list[tuple[str, str]]]:
    """The bundled calibration sample: the first 500 ALMA training pairs of each xx-en file."""
    out = {}
    for xx in pairs:
        records = read_json_records(DATA_DIR / "calib" / f"train.{xx}-en.jsonl")
        out[xx] = [(r["translation"][xx], r["translation"]["en"]) for r in records]
    return out


def alma_parallel(directions: list[tuple[str, str]], split: str = "train") -> dict[tuple[str, str], TestSet | None]:
    """ALMA's bundled human-written pairs of each direction (``split`` is ``train`` or ``valid``).

    ``train`` is what ALMA fine-tunes on in its second stage (WMT'17-'20 test sets, and FLORES-200 dev +
    devtest as the last 2009 lines of each file). A direction without that split (is-en has no ``valid``) maps
    to None; a direction ALMA does not cover is an AlmakError.

    >>> alma_parallel([("en", "de")])[("en", "de")].sources[0][:21]
    '28-Year-Old Chef Foun'
    """
    out, files = {}, {}  # files: each xx-en file read once, though it serves both directions
    for src, tgt in directions:
        xx = tgt if src == "en" else src
        if f"{src}-{tgt}" not in ALMA_DIRECTIONS:
            raise AlmakError(f"no bundled ALMA pairs for {src}-{tgt}; bundled: {', '.join(ALMA_DIRECTIONS)}")
        path = DATA_DIR / "alma" / f"{split}.{xx}-en.jsonl.gz"
        if not path.is_file():
            out[(src, tgt)] = None
            continue
        if path not in files:
            files[path] = read_json_records(path)
        records = files[path]
        out[(src, tgt)] = TestSet(f"alma-{split}:{src}-{tgt}", src, tgt, [r["translation"][src] for r in records],
                                  [r["translation"][tgt] for r in records])
    return out
