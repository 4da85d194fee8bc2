"""Translation prompts for the model families almak serves, and their post-processing.

Families:
- ``alma``: ALMA's zero-shot template (Xu et al. 2024), exactly as its evaluation builds it::

      Translate this from German to English:
      German: <source>
      English:

  The hypothesis is the first non-empty line after the target label.
- ``tower``: TowerInstruct's user turn, rendered through the tokenizer's ChatML chat template.
- ``llamax``: the Alpaca template LLaMAX3-8B-Alpaca was tuned on.
- ``chat``: any instruction model's own chat template with a plain instruction.
"""
from __future__ import annotations

from dataclasses import dataclass

from almak.errors import AlmakError
from almak.modeling.text.languages import language_name

FAMILIES = ("alma", "tower", "llamax", "chat")


def first_nonempty_line(text: str) -> str:
    """ALMA's post-processing: the first line after the target label that is not blank."""
    for line in text.split("\n"):
        if line.strip():
            return line.strip()
    return ""


@dataclass(frozen=True)
class Prompt:
    """A prompt family bound to a direction. ``build`` gives the text the model continues."""

    family: str
    src: str
    tgt: str

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise AlmakError(f"unknown prompt family {self.family!r}; choose one of {', '.join(FAMILIES)}")
        language_name(self.src), language_name(self.tgt)

    @property
    def uses_chat_template(self) -> bool:
        return self.family in ("tower", "chat")

    def build(self, text: str, tokenizer=None) -> str:
        src, tgt = language_name(self.src), language_name(self.tgt)
        if self.family == "alma":
            return f"Translate this from {src} to {tgt}:\n{src}: {text}\n{tgt}:"
        if self.family == "llamax":
            return (
                "Below is an instruction that describes a task, paired with an input that provides "
                "further context. Write a response that appropriately completes the request.\n"
                f"### Instruction:\nTranslate the following sentences from {src} to {tgt}.\n"
                f"### Input:\n{text}\n### Response:"
            )
        if self.family == "tower":
            user = f"Translate the following text from {src} into {tgt}.\n{src}: {text}\n{tgt}:"
        else:
            user = f"Translate the following {src} text into {tgt}. Reply with the translation only.\n\n{text}"
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise AlmakError(f"prompt family {self.family!r} needs a tokenizer with a chat template")
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )

    def continuation(self, reference: str) -> str:
        """The text that follows the prompt when the model writes ``reference`` (for teacher forcing)."""
        return reference if self.uses_chat_template else " " + reference

    def encode(self, text: str, reference: str, tokenizer, terminate: bool = False) -> tuple[list[int], list[int]]:
        """Token ids of the prompt for ``text`` and of ``reference`` after it; see :meth:`encode_many`.

        >>> p, t = Prompt("alma", "de", "en").encode("Hallo", "Hello", tok, terminate=True)  # doctest: +SKIP
        >>> tok.decode(t)                                                                      # doctest: +SKIP
        ' Hello\\n'
        """
        return self.encode_many([text], [reference], tokenizer, terminate)[0]

    def encode_many(self, texts: list[str], references: list[str], tokenizer,
                    terminate: bool = False) -> list[tuple[list[int], list[int]]]:
        """(prompt ids, target ids) of each source and reference: what teacher forcing scores (reference
        perplexity) and trains on (``almak finetune``), in one place.

        The two parts are tokenized apart, so the target tokens are exactly the reference's whatever the
        tokenizer would merge across the boundary. ``terminate`` appends what ends an answer, for a model to
        learn to stop: a newline for ``alma`` (its output is the first line after the target label), the
        tokenizer's EOS for the others (a chat turn and an Alpaca response end there).
        """
        if not texts:
            return []
        newline = terminate and self.family == "alma"
        if terminate and not newline and tokenizer.eos_token_id is None:
            raise AlmakError(f"prompt family {self.family!r} ends answers with EOS, but the tokenizer has none")
        prompts = tokenizer([self.build(t, tokenizer) for t in texts],
                            add_special_tokens=not self.uses_chat_template)["input_ids"]
        targets = tokenizer([self.continuation(r) + ("\n" if newline else "") for r in references],
                            add_special_tokens=False)["input_ids"]
        if terminate and not newline:
            targets = [t + [tokenizer.eos_token_id] for t in targets]
        return list(zip(prompts, targets))

    def postprocess(self, generated: str) -> str:
        return first_nonempty_line(generated)


def guess_family(model_ref: str, tokenizer=None) -> str:
    """Guess the prompt family from a model reference: Tower and LLaMAX by name, ALMA otherwise."""
    name = str(model_ref).lower()
    if "tower" in name:
        return "tower"
    if "llamax" in name:
        return "llamax"
    return "alma"
