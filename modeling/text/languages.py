"""Language codes: ISO 639-1 / 639-3 codes, BCP-47 tags and FLORES-200 codes, read with ``langcodes``.

Every code is normalized to one BCP-47 tag (:func:`lang_tag`): ``deu_Latn``, ``deu``, ``DE`` and ``de`` are all
``de``; a FLORES-200 code keeps its script only where the script tells two variants apart (``zho_Hant`` is
``zh-Hant``, ``zho_Hans`` is ``zh``). Individual languages that ISO 639-3 places under a macrolanguage as its
standard form take the macrolanguage's code (``arb`` is ``ar``, ``swh`` is ``sw``, ``zsm`` is ``ms``), while
distinct varieties keep theirs (``ary``, Moroccan Arabic), as do languages FLORES-200 tells apart from their
macrolanguage (``twi``, not Akan's ``ak``). The prompts name a language by its English name
(:func:`language_name`), as ALMA, LLaMAX and Tower were trained on.

The FLORES-200 language list is the one transformers' NLLB tokenizer carries (its language tokens are the
FLORES-200 codes); it decides which scripts a language name mentions and which codes an unknown one is compared
with.
"""
from __future__ import annotations

import difflib
import re
from functools import lru_cache

from almak.errors import AlmakError

_FLORES_RE = re.compile(r"^([a-z]{3})_([A-Z][a-z]{3})$")
_CODE_RE = re.compile(r"^[A-Za-z]{2,3}([-_][A-Za-z0-9]{2,8})*$")
# Where CLDR (langcodes' source) has renamed a language, the name FLORES-200 and the MT models' prompts use.
_PROMPT_NAMES = {"bn": "Bengali"}


@lru_cache(maxsize=1)
def flores200_codes() -> tuple[str, ...]:
    """The FLORES-200 language codes (``yor_Latn``, ...), as transformers' NLLB tokenizer lists them."""
    from transformers.models.nllb.tokenization_nllb import FAIRSEQ_LANGUAGE_CODES

    return tuple(FAIRSEQ_LANGUAGE_CODES)


@lru_cache(maxsize=1)
def _kept_apart() -> frozenset[str]:
    """FLORES-200 languages that the macrolanguage rule would merge with another FLORES-200 language (Twi into
    Akan): they keep their own code."""
    import langcodes

    groups: dict[str, set[str]] = {}
    for code in flores200_codes():
        lang = code.split("_")[0]
        groups.setdefault(langcodes.standardize_tag(lang, macro=True), set()).add(lang)
    return frozenset(langcodes.standardize_tag(lang) for tag, langs in groups.items() if len(langs) > 1
                     for lang in langs if langcodes.standardize_tag(lang) != tag)


@lru_cache(maxsize=None)
def _flores_scripts() -> dict[str, set[str]]:
    """Normalized language subtag -> the scripts FLORES-200 has it in."""
    import langcodes

    out: dict[str, set[str]] = {}
    for code in flores200_codes():
        lang, script = code.split("_")
        plain = langcodes.standardize_tag(lang)
        tag = plain if plain in _kept_apart() else langcodes.standardize_tag(lang, macro=True)
        out.setdefault(tag.split("-")[0], set()).add(script)
    return out


@lru_cache(maxsize=None)
def lang_tag(code: str) -> str:
    """The normalized BCP-47 tag of a language code (see the module docstring); an AlmakError naming the closest
    known codes when ``code`` names no language.

    >>> lang_tag("deu_Latn"), lang_tag("zho_Hant"), lang_tag("yor"), lang_tag("arb_Arab")
    ('de', 'zh-Hant', 'yo', 'ar')
    """
    import langcodes

    text = code.strip()
    if not _CODE_RE.match(text):
        raise unknown_language(code)
    try:
        bcp = text.replace("_", "-")
        plain = langcodes.standardize_tag(bcp)
        tag = plain if plain.split("-")[0] in _kept_apart() else langcodes.standardize_tag(bcp, macro=True)
        lang = langcodes.Language.get(tag)
    except (ValueError, LookupError):
        raise unknown_language(code) from None
    if not lang.is_valid() or lang.language in (None, "und") or "Unknown" in lang.display_name():
        raise unknown_language(code)
    if lang.script is None and lang.territory:  # zh-TW is written in Traditional characters: say so
        script = lang.maximize().script
        if script not in _default_scripts(lang.language):
            lang = lang.update_dict({"script": script})
    if lang.script and lang.script in _default_scripts(lang.language):
        lang = lang.update_dict({"script": None})
    return lang.to_tag()


def _default_scripts(language: str) -> set[str]:
    """Scripts a tag of ``language`` need not name: its likely script, and its only one in FLORES-200."""
    import langcodes

    likely = {langcodes.Language.get(language).maximize().script}
    flores = _flores_scripts().get(language, set())
    return likely | flores if len(flores) == 1 else likely


def language_name(code: str) -> str:
    """The English name a prompt uses for a language code; the script where it tells variants apart, and the
    region where the code names one.

    >>> language_name("de"), language_name("yor_Latn"), language_name("zho_Hant"), language_name("swh")
    ('German', 'Yoruba', 'Chinese (Traditional)', 'Swahili')
    """
    import langcodes

    lang = langcodes.Language.get(lang_tag(code))
    name = _PROMPT_NAMES.get(lang.language) or _plain(lang.language_name("en"))
    details = [_plain(lang.script_name("en"))] if lang.script else []
    if lang.territory:  # pt-BR, and FLORES-200's Dari (prs_Arab), which ISO 639-3 files as Persian in Afghanistan
        details.append(lang.territory_name("en"))
    return f"{name} ({', '.join(details)})" if details else name


def _plain(name: str) -> str:
    """A language name without ISO 639-3's qualifiers (Swahili, not Swahili (individual language))."""
    return name.replace(" (individual language)", "").replace(" (macrolanguage)", "")


def language_subtag(code: str) -> str:
    """The language part of a code's tag: ``zh`` for ``zho_Hant``; what BLEU's tokenizer is chosen by."""
    return lang_tag(code).split("-")[0]


def parse_lang_pair(pair: str) -> tuple[str, str]:
    """``"de-en" -> ("de", "en")``; ``"deu_Latn-yor_Latn" -> ("de", "yo")``; ``"zh-Hant-en"`` splits where both
    sides are languages. Both codes are normalized (:func:`lang_tag`)."""
    parts = pair.strip().split("-")
    if len(parts) < 2 or not all(parts):
        raise AlmakError(f"language pair {pair!r} is not of the form src-tgt (for example de-en or "
                         "deu_Latn-yor_Latn)")
    splits = []
    for i in range(1, len(parts)):
        try:
            splits.append((lang_tag("-".join(parts[:i])), lang_tag("-".join(parts[i:]))))
        except AlmakError:
            continue
    if len(splits) == 1:
        return splits[0]
    if not splits:
        if len(parts) == 2:  # name the side that is wrong
            lang_tag(parts[0]), lang_tag(parts[1])
        raise AlmakError(f"language pair {pair!r}: no split of it gives two known languages")
    raise AlmakError(f"language pair {pair!r} is ambiguous ({' or '.join('-'.join(s) for s in splits)}); write "
                     "the codes with underscores for scripts (zho_Hant-eng_Latn)")


def unknown_language(code: str) -> AlmakError:
    """The error for a code that names no language, with the closest codes and names."""
    suggestions = closest_languages(code)
    hint = f"; closest: {', '.join(suggestions)}" if suggestions else ""
    return AlmakError(f"unknown language code {code!r}{hint} (ISO 639-1/639-3 codes such as de, yo, yor, or "
                      "FLORES-200 codes such as yor_Latn)")


def closest_languages(code: str, n: int = 4) -> list[str]:
    """Up to ``n`` known codes nearest to ``code``, as ``"yo (Yoruba)"``: by spelling against the FLORES-200
    codes, their short forms and their English names."""
    import langcodes

    table: dict[str, str] = {}  # key (lower case) -> code shown
    for flores in flores200_codes():
        lang = flores.split("_")[0]
        short = langcodes.standardize_tag(lang, macro=True)
        name = _plain(langcodes.Language.get(short).language_name("en"))
        for key, shown in ((flores.lower(), flores), (lang, short), (short, short), (name.lower(), short)):
            table.setdefault(key, shown)
    query = code.strip().lower()
    out: list[str] = []
    for key in difflib.get_close_matches(query, list(table), n=3 * n, cutoff=0.6):
        shown = table[key]
        label = f"{shown} ({language_name(shown)})"
        if label not in out:
            out.append(label)
    return out[:n]
