"""Model cards (`hf_distill.model_card`, `hf_distill.card_sections`): every teacher source names its teacher through
`TeacherSource.card_teacher`, shorthands resolve to their Hub ids and licenses through the one table in
`hf_distill.models`, the reproducing command carries the launcher, private values stay out of the card, and every card
passes the offline check of the Hub's metadata spec (`check_card`). Whole CLI runs and their verbatim reruns are in
tests/test_model_card_runs.py."""

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import distill_config, make_llama, make_lm_trainer, make_tokenizer, tokenized_texts
from huggingface_hub import ModelCard, ModelCardData
from transformers import DataCollatorForLanguageModeling

from hf_distill import DistillationConfig, DistillationTrainer
from hf_distill.card_sections import applied_settings, check_card, eval_results
from hf_distill.model_card import (
    NO_TEACHER,
    CardTeacher,
    build_model_card,
    cached_teacher,
    card_license,
    data_writer,
    dataset_lines,
    dataset_list,
    lineage,
    trainer_model_card,
)
from hf_distill.models import SHORTHANDS, shorthand_of
from hf_distill.recipes import Recipe
from hf_distill.student import PeerStudents
from hf_distill.teachers import CachedCrossTokenizerTeacher, CacheTeacher, TeacherSource
from hf_distill.teachers.served import host_kind


TEXTS = ["the cat sat on the mat", "a dog ran fast", "one plus two equals three", "the red cat is big"]
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


def card_of(trainer) -> str:
    card = trainer_model_card(trainer)
    check_card(card)
    return str(card)


# ------------------------------------------------------------------------------------------------ teachers
def test_a_live_teacher_is_named_with_its_fingerprint_and_the_none_source_says_none(tmp_path):
    tok = make_tokenizer()
    card = card_of(make_lm_trainer(tmp_path, tok, TEXTS))
    assert "- **Teacher:** `LlamaForCausalLM` (fingerprint " in card
    plain = card_of(make_lm_trainer(tmp_path, tok, TEXTS, kd_weight=0.0, ce_weight=1.0))  # teacher never loaded
    assert f"- **Teacher:** {NO_TEACHER}" in plain and "| `kd_loss` |" not in plain and "Method:" not in plain


def test_an_ema_run_names_the_moving_average_not_none(tmp_path):
    tok = make_tokenizer()
    trainer = DistillationTrainer(model=make_llama(2, 32), args=distill_config(tmp_path, teacher_ema_decay=0.99),
                                  train_dataset=tokenized_texts(tok, TEXTS),
                                  data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
                                  processing_class=tok)  # fmt: skip
    card = card_of(trainer)
    assert "exponential moving average of the student itself (`teacher_ema_decay: 0.99`" in card
    assert "none" not in card.split("- **Teacher:**")[1].split("\n")[0]
    assert "| `teacher_ema_decay` | 0.99 |" in card


def test_several_teachers_are_each_named_with_mode_and_weights(tmp_path):
    tok = make_tokenizer()
    trainer = DistillationTrainer(
        model=make_llama(2, 32),
        teacher_model=[make_llama(2, 32, seed=1), make_llama(2, 32, seed=2)],
        args=distill_config(tmp_path, teacher_weights=[0.7, 0.3], multi_teacher_mode="sum"),
        train_dataset=tokenized_texts(tok, TEXTS),
        data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
        processing_class=tok,
    )
    card = card_of(trainer)
    assert "- **Teacher:** 2 teachers, `multi_teacher_mode: sum`, weights 0.7, 0.3: `LlamaForCausalLM`" in card
    assert card.count("(fingerprint ") == 2


def test_peers_name_each_other_and_the_snippet_loads_the_first_peer(tmp_path):
    tok = make_tokenizer()
    trainer = DistillationTrainer(model=PeerStudents([make_llama(2, 32, seed=0), make_llama(2, 32, seed=1)]),
                                  args=distill_config(tmp_path), train_dataset=tokenized_texts(tok, TEXTS),
                                  data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
                                  processing_class=tok)  # fmt: skip
    card = card_of(trainer)
    assert "the other peers: 2 peer students trained together" in card and 'subfolder="peer0"' in card


def test_cached_and_served_teachers_are_named_without_urls():
    info = {"k": 8, "teacher": {"name_or_path": "smollm2", "config_sha256": "ab" * 32}}
    line = cached_teacher(info).description
    assert line.startswith(f"`smollm2` ({SMOLLM2}: ") and "top-8 teacher cache" in line and "abababab" in line
    served = cached_teacher({"k": 4, "teacher": {"served": ["ns/teacher"]}})
    assert served.base_models == ["ns/teacher"] and "OpenAI-compatible HTTP API" in served.description
    for source in (CacheTeacher, CachedCrossTokenizerTeacher):  # each source of a cache overrides the method
        assert source.card_teacher is not TeacherSource.card_teacher
    kinds = [host_kind(u) for u in ("http://127.0.0.1:8000/v1", "http://localhost:1", "http://10.2.3.4/v1",
                                    "https://api.example.com/v1", "http://[::1]:80")]  # fmt: skip
    assert kinds == ["on this machine", "on this machine", "on a private network", "remote", "on this machine"]


def test_the_default_describes_sources_that_do_not_override_it():
    """A new source (e.g. `self`, context distillation) gets a truthful line before it overrides `card_teacher`."""
    args = SimpleNamespace(teacher_model_name_or_path="self", teacher_model_init_kwargs=None)
    context = SimpleNamespace(args=args)

    class SelfTaught(TeacherSource):
        kind, name, starts_as_student = "self", "self", True

    class Unnamed(TeacherSource):
        kind, name = "unnamed", "unnamed"

    assert TeacherSource(context).card_teacher() is None
    assert SelfTaught(context).card_teacher().description.startswith("the student itself (teacher source `self`)")
    assert Unnamed(context).card_teacher().description == "teacher source `unnamed` (it names no teacher model)"
    live = Unnamed(context)
    live.models = [make_llama(2, 32)]
    assert live.card_teacher().base_models == ["self"]  # a live model is named as the config names it


# ------------------------------------------------------------------------------------------------ lineage and license
def test_shorthands_resolve_through_the_one_table(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DISTILL_CACHE", str(tmp_path / "cache"))  # where gemma3's GGUF is assembled, none yet
    assert SHORTHANDS["gemma3"].folder() == str(tmp_path / "cache" / "gemma3")
    assert shorthand_of(str(tmp_path / "cache" / "gemma3" / "model.gguf")) == "gemma3"
    assert lineage("smollm2") == SMOLLM2 and card_license("smollm2") == "apache-2.0"
    assert lineage("gemma3") == "google/gemma-3-270m" and card_license("gemma3") == "gemma"
    folder = SHORTHANDS["smollm2"].folder()
    if folder is not None:  # a model loaded from the wheel has the wheel's folder as its `_name_or_path`
        assert shorthand_of(folder) == "smollm2" and lineage(folder) == SMOLLM2
    card = build_model_card(model_name="s", teacher=None, student_description="d", losses={}, base_model="smollm2")
    assert card.data.base_model == SMOLLM2 and card.data.license == "apache-2.0" and check_card(card)
    assert shorthand_of(str(tmp_path)) is None and lineage(str(tmp_path)) is None


def test_license_is_inherited_from_a_local_folder_card_or_the_hub_cache(tmp_path, monkeypatch):
    base = tmp_path / "base"
    base.mkdir()
    ModelCard("---\nlicense: mit\nbase_model: ns/origin\n---\n# base\n").save(base / "README.md")
    card = build_model_card(model_name="s", teacher=str(base), student_description="d", losses={})
    assert card.data.base_model == "ns/origin" and card.data.license == "mit"
    snapshot = tmp_path / "hub" / "models--ns--licensed" / "snapshots" / ("c" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "README.md").write_text("---\nlicense: cc-by-4.0\n---\n# licensed\n")
    (tmp_path / "hub" / "models--ns--licensed" / "refs").mkdir()
    (tmp_path / "hub" / "models--ns--licensed" / "refs" / "main").write_text("c" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert card_license("ns/licensed") == "cc-by-4.0" and card_license("ns/unknown") is None
    clash = build_model_card(model_name="s", teacher=CardTeacher("two", ["smollm2", "gemma3"]),
                             student_description="d", losses={})  # fmt: skip
    assert clash.data.license is None and "- **License:** apache-2.0, gemma" in str(clash)  # two licenses: body only


# ------------------------------------------------------------------------------------------------ metadata
def test_metadata_model_index_datasets_and_the_offline_check(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("{}")
    results = eval_results({"eval_loss": 1.5, "eval_kd_loss": 0.25, "eval_runtime": 3.0, "epoch": 1}, "causal_lm",
                           str(data), "train")  # fmt: skip
    assert [(r.metric_type, r.metric_value) for r in results] == [("loss", 1.5), ("kd_loss", 0.25)]
    card = build_model_card(model_name="tiny", teacher="smollm2", student_description="d", losses={"kd_loss": "tvd"},
                            dataset=str(data), evaluation=results, head_kind="seq2seq")  # fmt: skip
    meta = check_card(card)
    assert meta.pipeline_tag == "text2text-generation" and meta.datasets is None and meta.eval_results[0].dataset_split
    assert "local data `train.jsonl` (not on the Hub)" in str(card) and "AutoModelForSeq2SeqLM" in str(card)
    loaded = ModelCard.load(_saved(card, tmp_path)).data
    assert ModelCardData(**loaded.to_dict()).to_dict() == loaded.to_dict() == meta.to_dict()
    assert build_model_card(model_name="t", teacher=None, student_description="d", losses={},
                            dataset="ns/data").data.datasets == ["ns/data"]  # fmt: skip
    bad = {
        "license: not-a-license": "not a Hub license id",
        "base_model: ./local/folder": "not a Hub repo id",
        "datasets:\n- ../data.jsonl": "not a Hub repo id",
        "teacher: x": "not in the Hub's model card spec",
        "pipeline_tag: text-to-image": "pipeline_tag",
        "model-index:\n- name: x\n  results: [{}]": "model-index|model_index",
    }
    for line, message in bad.items():
        with pytest.raises(ValueError, match=message):
            check_card(f"---\ntags:\n- hf-distill\n- distillation\n{line}\n---\n# card\n")


def _saved(card, tmp_path):
    path = tmp_path / "README.md"
    card.save(path)
    return path


def test_settings_table_lists_what_applies(tmp_path):
    args = DistillationConfig(output_dir=str(tmp_path), kd_loss="jsd", beta=0.3, lmbda=0.5, skew_alpha=0.2,
                              hint_layers="uniform", report_to=[])  # fmt: skip
    settings = applied_settings(args)
    assert {"kd_loss", "temperature", "kd_weight", "ce_weight", "beta", "lmbda", "max_new_tokens", "hint_layers",
            "hint_loss", "hint_weight"} <= set(settings)  # fmt: skip
    assert "skew_alpha" not in settings and "attention_loss" not in settings and "relation_weight" not in settings
    assert set(applied_settings(args, with_teacher=False)) & {"kd_loss", "temperature", "beta"} == set()


def test_the_writer_of_generated_rationales_is_named(tmp_path):
    (tmp_path / "gen" / "dataset").mkdir(parents=True)
    (tmp_path / "gen" / "meta.json").write_text(json.dumps({"template": "esnli", "teacher": "api:gpt-4o-mini"}))
    assert data_writer(str(tmp_path / "gen" / "dataset")).startswith("rationales written by `gpt-4o-mini` through")
    (tmp_path / "gen" / "meta.json").write_text(json.dumps({"template": "svamp", "teacher": "smollm2"}))
    assert f"`smollm2` ({SMOLLM2}" in data_writer(str(tmp_path / "gen" / "dataset"))
    assert data_writer(str(tmp_path / "nowhere")) is None and data_writer("ns/data") is None


def test_card_of_an_evaluated_run_has_a_model_index(tmp_path):
    tok = make_tokenizer()
    trainer = DistillationTrainer(model=make_llama(2, 32), teacher_model=make_llama(2, 32, seed=1),
                                  args=distill_config(tmp_path, eval_strategy="steps", eval_steps=2),
                                  train_dataset=tokenized_texts(tok, TEXTS), eval_dataset=tokenized_texts(tok, TEXTS),
                                  data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
                                  processing_class=tok)  # fmt: skip
    trainer.train()
    card = trainer_model_card(trainer)
    meta = check_card(card)
    assert "| student (last evaluation) |" in str(card) and "eval_runtime" not in str(card)  # timings are no results
    metrics = {r.metric_type: r.metric_value for r in meta.eval_results}
    assert meta.model_name == "out" and "loss" in metrics and "kd_loss" in metrics and torch.isfinite(
        torch.tensor(metrics["loss"]))  # fmt: skip


# ------------------------------------------------------------------------------------------------ dataset mixtures
def test_a_mixture_lists_every_hub_dataset_and_names_local_ones_in_the_body(tmp_path):
    """`hf-distill train` passes a mixture's `datasets:` paths as a list: each Hub id goes in `datasets`, each local
    file is named in the body (never its path), and the held-out share is the `model-index`'s dataset."""
    local = tmp_path / "private" / "extra.jsonl"
    local.parent.mkdir()
    local.write_text("{}")
    mixture = ["ns/data-a", str(local), "ns/data-b"]
    assert dataset_list(mixture) == mixture and dataset_list("ns/a") == ["ns/a"] and dataset_list(None) == []
    line = dataset_lines(mixture)
    assert line.startswith("a mixture of 3 datasets: [ns/data-a](https://huggingface.co/datasets/ns/data-a), ")
    assert "local data `extra.jsonl` (not on the Hub)" in line and str(local.parent) not in line
    tok = make_tokenizer()
    trainer = make_lm_trainer(tmp_path, tok, TEXTS)
    trainer.create_model_card(dataset_name=mixture)
    card = (tmp_path / "out" / "README.md").read_text()
    assert check_card(card).datasets == ["ns/data-a", "ns/data-b"] and str(local.parent) not in card
    assert "local data `extra.jsonl` (not on the Hub)" in card
    # the recipe's own `datasets:` when no list is passed (a checkpoint's card), and the held-out share evaluated
    config = {"datasets": [{"path": "ns/data-a", "fraction": 0.5}, {"path": str(local), "fraction": 0.5}],
              "test_split_size": 0.25}  # fmt: skip
    trainer.recipe = Recipe(config, "hf-distill train --config mix.yaml")
    trainer.state.log_history.append({"eval_loss": 2.5, "step": 1})
    meta = check_card(trainer_model_card(trainer))
    assert meta.datasets == ["ns/data-a"]
    result = meta.eval_results[0]
    assert (result.dataset_type, result.dataset_split, result.metric_value) == ("mixture", "test", 2.5)
    assert result.dataset_name == "held-out share of a mixture of 2 datasets"
