"""Build a tiny random-weight COMET model offline, laid out as unbabel-comet's hub checkpoints are.

Layout (what ``comet.load_from_checkpoint`` and ``almak.eval.metrics.comet`` expect)::

    root/
      hparams.yaml            # read from checkpoint_path.parents[1]; names the class and the encoder folder
      checkpoints/model.ckpt  # a pytorch-lightning checkpoint (state_dict + hyper_parameters)
      encoder/                # XLM-R tokenizer + config; load_pretrained_weights=False so no weights are read

Needs ``comet`` (unbabel-comet), ``transformers`` and ``tokenizers``; nothing touches the network.
"""
from __future__ import annotations

from pathlib import Path

SENTENCES = [
    "Das Haus ist klein.",
    "The house is small.",
    "Der Hund schläft im Garten.",
    "The dog is sleeping in the garden.",
    "Ich trinke gern Kaffee am Morgen.",
    "I like drinking coffee in the morning.",
    "Wir fahren morgen nach Berlin.",
    "We are going to Berlin tomorrow.",
    "Es regnet seit drei Tagen.",
    "It has been raining for three days.",
]

SPECIAL = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # XLM-R's ids 0..3, <mask> last as in XLM-R


def build_encoder(folder: Path, hidden: int = 32, layers: int = 2, vocab_size: int = 200) -> Path:
    """A Unigram tokenizer trained on SENTENCES plus a tiny XLMRobertaConfig, saved to ``folder``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import XLMRobertaConfig, XLMRobertaTokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, unk_token="<unk>",
                                      show_progress=False)
    tok.train_from_iterator(SENTENCES, trainer=trainer)
    ids = {t: tok.token_to_id(t) for t in SPECIAL}
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", ids["<s>"]), ("</s>", ids["</s>"])],
    )
    fast = XLMRobertaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                   cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
                                   model_max_length=128)
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(folder)
    config = XLMRobertaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=2 * hidden, max_position_embeddings=130, type_vocab_size=1,
        pad_token_id=ids["<pad>"], bos_token_id=ids["<s>"], eos_token_id=ids["</s>"],
    )
    config.save_pretrained(folder)
    return folder


def build_comet(root: Path, hidden: int = 32, layers: int = 2) -> Path:
    """Write a loadable random-weight RegressionMetric under ``root``; returns ``root``."""
    import pytorch_lightning
    import torch
    import yaml
    from comet.models import RegressionMetric

    encoder = build_encoder(root / "encoder", hidden, layers)
    hparams = dict(
        pretrained_model=str(encoder), load_pretrained_weights=False, local_files_only=True,
        hidden_sizes=[16], nr_frozen_epochs=0.3, keep_embeddings_frozen=True,
        layer="mix", layer_transformation="softmax", layer_norm=True, pool="avg",
        activations="Tanh", final_activation=None, dropout=0.1, batch_size=4,
    )
    torch.manual_seed(0)
    model = RegressionMetric(**hparams)
    full = dict(model.hparams)  # every constructor argument, with class_identifier as comet saves it
    full["class_identifier"] = "regression_metric"
    (root / "checkpoints").mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": full,
                "pytorch-lightning_version": pytorch_lightning.__version__, "epoch": 0, "global_step": 0},
               root / "checkpoints" / "model.ckpt")
    (root / "hparams.yaml").write_text(yaml.safe_dump(full), encoding="utf-8")
    return root


if __name__ == "__main__":  # python tests/eval/comet_tiny.py OUT_DIR
    import sys

    print(build_comet(Path(sys.argv[1])))
