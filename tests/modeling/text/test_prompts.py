import pytest

from almak.errors import AlmakError
from almak.modeling.text.prompts import Prompt, first_nonempty_line, guess_family


def test_alma_template_is_exact():
    assert Prompt("alma", "de", "en").build("Hallo Welt") == (
        "Translate this from German to English:\nGerman: Hallo Welt\nEnglish:"
    )


def test_llamax_template_ends_with_response_marker():
    text = Prompt("llamax", "en", "zh").build("Hi")
    assert "Translate the following sentences from English to Chinese." in text
    assert text.endswith("### Input:\nHi\n### Response:")


@pytest.mark.parametrize("family", ["tower", "chat"])
def test_chat_families_use_the_tokenizer_template(smollm, family):
    text = Prompt(family, "de", "en").build("Hallo Welt", smollm.tokenizer)
    assert text.startswith("<|im_start|>") and "Hallo Welt" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_chat_family_without_template_is_refused():
    with pytest.raises(AlmakError, match="chat template"):
        Prompt("tower", "de", "en").build("Hallo", tokenizer=None)


@pytest.mark.parametrize("text, expected", [
    (" The goods cost 20 euros.\nGerman: more", "The goods cost 20 euros."),
    ("\n\n  Second line wins \n", "Second line wins"),
    ("", ""),
])
def test_first_nonempty_line(text, expected):
    assert first_nonempty_line(text) == expected


def test_guess_family():
    assert guess_family("Unbabel/TowerInstruct-Mistral-7B-v0.2") == "tower"
    assert guess_family("LLaMAX/LLaMAX3-8B-Alpaca") == "llamax"
    assert guess_family("haoranxu/ALMA-7B") == "alma"
    assert guess_family("smollm2-135m") == "alma"
