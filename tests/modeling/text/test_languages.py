"""Language codes (ISO 639-1/639-3, FLORES-200), their prompt names, BLEU tokenizers, spBLEU and FLORES-200 sets."""
from pathlib import Path

import pytest

from almak.errors import AlmakError
from almak.modeling.text.languages import closest_languages, flores200_codes, lang_tag, language_name, parse_lang_pair
from almak.modeling.text.prompts import Prompt

FLORES_DIR = Path(__file__).resolve().parents[2] / "data" / "flores200"


def test_every_flores200_code_has_a_name_and_variants_are_told_apart():
    codes = flores200_codes()
    assert len(codes) >= 200 and "yor_Latn" in codes and "zho_Hant" in codes
    tags = {c: lang_tag(c) for c in codes}
    names = {c: language_name(c) for c in codes}
    assert not [c for c, n in names.items() if not n or "Unknown" in n or "individual language" in n]
    # two FLORES codes share a prompt name only when they are the same language in the same script
    by_name = {}
    for c in codes:
        by_name.setdefault(names[c], set()).add(tags[c])
    assert all(len(t) == 1 for t in by_name.values()), {n: t for n, t in by_name.items() if len(t) > 1}
    assert len(set(tags.values())) == len(codes)


def test_alma_languages_keep_their_prompt_names():
    # the names ALMA's prompts were trained with (the table almak had before it read langcodes)
    expected = {"ar": "Arabic", "bn": "Bengali", "cs": "Czech", "de": "German", "el": "Greek", "en": "English",
                "fa": "Persian", "is": "Icelandic", "ja": "Japanese", "ko": "Korean", "no": "Norwegian",
                "ru": "Russian", "sl": "Slovenian", "sw": "Swahili", "uk": "Ukrainian", "zh": "Chinese", "fr": "French"}
    assert {c: language_name(c) for c in expected} == expected


@pytest.mark.parametrize("codes, tag, name", [
    (("yo", "yor", "yor_Latn", "YO", "yor-Latn"), "yo", "Yoruba"),
    (("de", "deu", "deu_Latn", "ger"), "de", "German"),
    (("zh", "zho", "zho_Hans", "cmn"), "zh", "Chinese"),
    (("zho_Hant", "zh-Hant"), "zh-Hant", "Chinese (Traditional)"),
    (("zh-TW",), "zh-Hant-TW", "Chinese (Traditional, Taiwan)"),
    (("prs_Arab",), "fa-AF", "Persian (Afghanistan)"),
    (("arb_Arab", "arb", "ar"), "ar", "Arabic"),
    (("ary_Arab",), "ary", "Moroccan Arabic"),
    (("swh_Latn", "sw"), "sw", "Swahili"),
    (("ace_Arab",), "ace-Arab", "Acehnese (Arabic)"),
    (("ace_Latn",), "ace", "Acehnese"),
    (("twi_Latn", "twi", "tw"), "tw", "Twi"),
    (("aka_Latn", "ak"), "ak", "Akan"),
    (("srp_Cyrl", "sr"), "sr", "Serbian"),
    (("ben_Beng", "bn"), "bn", "Bengali"),
])
def test_codes_of_one_language_agree(codes, tag, name):
    assert {lang_tag(c) for c in codes} == {tag}
    assert {language_name(c) for c in codes} == {name}


@pytest.mark.parametrize("code, suggestion", [
    ("yorr", "yo (Yoruba)"), ("deu_Latm", "deu_Latn (German)"), ("german", "de (German)"), ("yoruba", "yo (Yoruba)"),
])
def test_unknown_codes_name_the_closest(code, suggestion):
    assert suggestion in closest_languages(code)
    with pytest.raises(AlmakError, match=rf"unknown language code '{code}'; closest: .*{suggestion.split()[0]}"):
        lang_tag(code)


@pytest.mark.parametrize("code", ["xx", "", "qaa", "de_Xxxx", "123", "e n"])
def test_non_languages_are_refused(code):
    with pytest.raises(AlmakError, match="unknown language code"):
        lang_tag(code)


def test_lang_pairs():
    assert parse_lang_pair("DE-en") == ("de", "en")
    assert parse_lang_pair("deu_Latn-yor_Latn") == ("de", "yo")
    assert parse_lang_pair("zh-Hant-en") == ("zh-Hant", "en")
    assert parse_lang_pair("en-zho_Hant") == ("en", "zh-Hant")
    with pytest.raises(AlmakError, match="not of the form src-tgt"):
        parse_lang_pair("deen")
    with pytest.raises(AlmakError, match="unknown language code 'xx'"):
        parse_lang_pair("xx-en")


def test_llamax_prompt_names_flores_languages():
    text = Prompt("llamax", "yor_Latn", "zho_Hant").build("Ẹ kú àárọ̀")
    assert "Translate the following sentences from Yoruba to Chinese (Traditional)." in text
    assert Prompt("alma", "yo", "en").build("x") == "Translate this from Yoruba to English:\nYoruba: x\nEnglish:"


@pytest.mark.parametrize("tgt, tokenizer", [
    ("zh", "zh"), ("zho_Hant", "zh"), ("ja", "ja-mecab"), ("jpn_Jpan", "ja-mecab"), ("ko", "ko-mecab"),
    ("kor_Hang", "ko-mecab"), ("de", "13a"), ("yor_Latn", "13a"),
])
def test_bleu_tokenizer_follows_sacrebleu(tgt, tokenizer):
    from almak.eval.metrics import bleu_tokenizer

    assert bleu_tokenizer(tgt) == tokenizer
    assert bleu_tokenizer(tgt, "char") == "char"


def test_bleu_on_japanese_and_korean_uses_mecab():
    from almak.eval.metrics import bleu

    pytest.importorskip("MeCab")
    pytest.importorskip("mecab_ko")
    for tgt, hyp, ref, tok in (("ja", "今日は良い天気です", "今日は良い天気", "ja-mecab"),
                               ("ko", "안녕하세요 세계", "안녕하세요 세계입니다", "ko-mecab")):
        score, signature = bleu([hyp], [ref], tgt)
        assert f"tok:{tok}" in signature
        assert score != bleu([hyp], [ref], tgt, "13a")[0]  # the tokenizer changes the n-grams


def test_missing_mecab_is_one_clear_error(monkeypatch):
    import sacrebleu.tokenizers.tokenizer_ko_mecab as ko

    from almak.eval.metrics import check_metrics

    monkeypatch.setattr(ko, "MeCab", None)
    with pytest.raises(AlmakError, match=r"ko-mecab tokenizer for Korean needs MeCab-ko: pip install "
                                         r"'sacrebleu\[ko\]' \(or 'almak\[ko\]'\); or pick another tokenizer"):
        check_metrics(["bleu"], "kor_Hang")
    check_metrics(["bleu"], "kor_Hang", "13a")  # another tokenizer asked for: no error


@pytest.fixture
def flores_spm(tmp_path, monkeypatch):
    """A small SentencePiece model standing in for FLORES-200's at the path sacrebleu reads it from (the real one
    is a download this machine cannot make); sacrebleu's own flores200 tokenizer loads it from there."""
    spm = pytest.importorskip("sentencepiece")
    import sacrebleu.tokenizers.tokenizer_spm as tokenizer_spm

    from almak.modeling.text.data import load_testset

    text = tmp_path / "train.txt"
    ts = load_testset("wmt22:de-en").head(300)
    text.write_text("\n".join(ts.sources + ts.references) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "m"), vocab_size=400,
                                   minloglevel=2)
    monkeypatch.setattr(tokenizer_spm, "SACREBLEU_DIR", str(tmp_path / "sacrebleu"))
    from almak.eval.metrics import flores200_spm_path

    path = flores200_spm_path()
    path.parent.mkdir(parents=True)
    (tmp_path / "m.model").rename(path)
    return spm.SentencePieceProcessor(model_file=str(path))


def test_spbleu_is_bleu_over_sentencepiece_pieces(flores_spm):
    from sacrebleu.metrics import BLEU

    from almak.eval.metrics import bleu, spbleu
    from almak.modeling.text.data import load_testset

    ts = load_testset("wmt22:de-en").head(20)
    hyps = [r.replace("the", "a") for r in ts.references[::-1][:10]] + ts.references[10:]
    score, signature = spbleu(hyps, ts.references, "en")
    pieces = lambda lines: [" ".join(flores_spm.encode(line, out_type=str)) for line in lines]  # noqa: E731
    expected = BLEU(tokenize="none").corpus_score(pieces(hyps), [pieces(ts.references)]).score
    assert score == pytest.approx(expected, abs=1e-9)
    assert "tok:flores200" in signature
    assert abs(score - bleu(hyps, ts.references, "en")[0]) > 0.1  # not 13a BLEU under another name


def test_spbleu_without_its_model_says_how_to_get_it(tmp_path, monkeypatch):
    pytest.importorskip("sentencepiece")
    import sacrebleu.tokenizers.tokenizer_spm as tokenizer_spm

    from almak.eval.metrics import check_metrics

    monkeypatch.setattr(tokenizer_spm, "SACREBLEU_DIR", str(tmp_path))
    with pytest.raises(AlmakError, match=r"spBLEU needs FLORES-200's SentencePiece model at .*flores200sacrebleuspm"
                                         r".*curl -L -o .* https://tinyurl.com/flores200sacrebleuspm"):
        check_metrics(["spbleu"], "yo")


@pytest.mark.parametrize("spec, layout, pair, n", [
    ("flores200:deu_Latn-eng_Latn", "standard", ("de", "en"), 8),
    ("flores200-dev:zho_Hans-isl_Latn", "standard", ("zh", "is"), 8),
    ("flores200:ru-cs", "flat", ("ru", "cs"), 8),
])
def test_flores200_sets_from_a_folder(tmp_path, spec, layout, pair, n):
    from almak.modeling.text.data import load_testset

    folder = FLORES_DIR
    if layout == "flat":  # the files side by side, as the project's shared data keeps them
        folder = tmp_path
        for f in FLORES_DIR.glob("*/*"):
            (tmp_path / f.name).write_bytes(f.read_bytes())
    ts = load_testset(spec, flores_dir=folder)
    assert (ts.src, ts.tgt, len(ts.sources)) == (*pair, n) and ts.name == spec
    split = "dev" if spec.startswith("flores200-dev") else "devtest"
    side = {"de": "deu_Latn", "zh": "zho_Hans", "ru": "rus_Cyrl", "en": "eng_Latn", "is": "isl_Latn", "cs": "ces_Latn"}
    lines = (FLORES_DIR / split / f"{side[pair[0]]}.{split}").read_text(encoding="utf-8").splitlines()
    ref_lines = (FLORES_DIR / split / f"{side[pair[1]]}.{split}").read_text(encoding="utf-8").splitlines()
    assert ts.sources == lines and ts.references == ref_lines


@pytest.mark.parametrize("spec, folder, message", [
    ("flores200:deu_Latn-yor_Latn", FLORES_DIR, r"has no devtest file for 'yor_Latn' \(Yoruba\); it has ces_Latn"),
    ("flores200:deu_Latn-eng_Latn", None, "FLORES-200 is not bundled; pass the folder"),
    ("flores200:deu_Latn-eng_Latn", "/nonexistent", "FLORES-200 folder '/nonexistent' does not exist"),
    ("flores200:deu_Latn-eng_Latn", Path(__file__).parent, "holds no FLORES-200 devtest files"),
    ("flores200:deu_Latn-xx", FLORES_DIR, "unknown language code 'xx'"),
])
def test_flores200_errors(spec, folder, message):
    from almak.modeling.text.data import load_testset

    with pytest.raises(AlmakError, match=message):
        load_testset(spec, flores_dir=folder)


def test_flores200_mismatched_line_counts(tmp_path):
    from almak.modeling.text.data import load_testset

    (tmp_path / "deu_Latn.devtest").write_text("a\nb\nc\n", encoding="utf-8")
    (tmp_path / "eng_Latn.devtest").write_text("a\nb\n", encoding="utf-8")
    with pytest.raises(AlmakError, match="deu_Latn.devtest has 3 lines but eng_Latn.devtest has 2"):
        load_testset("flores200:deu_Latn-eng_Latn", flores_dir=tmp_path)
