"""A synthetic knowledge world and a small model trained on it, to measure editing on a laptop.

    from massedit.world import build_world, load_world_model, recall
    info = build_world("worlds/gpt2", n_subjects=200, arch="gpt2", seed=0)
    model, tok, world = load_world_model("worlds/gpt2")
    recall(model, tok, world, "paraphrase")["full_top1"]

`generate` holds the world (names, relations, templates, facts, CounterFact/zsRE records,
corpus), `languages` a second, invented language for cross-lingual editing, `train` the
tokenizer, the models and recall, `build` the cached, atomic build.
"""
from massedit.world.build import build_world, is_complete, load_world_model, read_build
from massedit.world.generate import (
    World,
    corpus_documents,
    counterfact_records,
    generate_world,
    load_world,
    reference_texts,
    write_world_files,
    zsre_records,
)
from massedit.world.languages import second_language, subject_token_jaccard
from massedit.world.train import SPLITS, TrainConfig, preset, recall, recall_all, train_tokenizer

__all__ = [
    "World", "build_world", "corpus_documents", "counterfact_records", "generate_world", "is_complete",
    "load_world", "load_world_model", "preset", "read_build", "recall", "recall_all", "reference_texts",
    "second_language", "SPLITS", "subject_token_jaccard", "TrainConfig", "train_tokenizer", "write_world_files", "zsre_records",
]
