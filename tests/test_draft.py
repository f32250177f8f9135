"""Draft models for speculative decoding (`hf_distill.draft`, `hf-distill draft evaluate`): acceptance counted from
transformers' assisted decoding, checked against a step-by-step reference on tiny random models built from configs."""

import contextlib
import copy
import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, WORDS, make_llama, make_tokenizer

from hf_distill.cli.main import main
from hf_distill.draft import (
    AcceptanceCounts,
    count_acceptance,
    encode_prompt,
    evaluate_draft,
    greedy_acceptance,
    prompts_from_dataset,
    same_vocabulary,
)
from hf_distill.student import init_student_from_teacher


PROMPTS = ["the cat sat on the mat", "two plus two equals", "is the dog big", "a red cat ran fast"]
REPORT_FIELDS = {
    "acceptance_rate",
    "mean_accepted_tokens",
    "target_tokens_per_s",
    "assisted_tokens_per_s",
    "speedup",
    "identical",
    "num_prompts",
    "new_tokens",
    "proposed_tokens",
    "accepted_tokens",
    "target_forwards",
}


@pytest.fixture
def tok():
    return make_tokenizer()


@pytest.fixture
def target():
    return make_llama(2, 32, seed=0).eval()


@torch.no_grad()
def reference_counts(target, draft, ids: list[int], k: int, max_new_tokens: int) -> dict:
    """Greedy speculative decoding written out step by step (the test's own reference, not the library's code): each
    round the draft proposes up to k greedy tokens (stopping at EOS and one short of the length limit), the target
    keeps the longest prefix equal to its own greedy continuation plus one token of its own."""
    eos = target.generation_config.eos_token_id
    out = target.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=0)
    truth = out[0, len(ids) :].tolist()
    limit = len(ids) + max_new_tokens
    pos, proposed, accepted, forwards, rejections = 0, 0, 0, 0, 0
    while pos < len(truth):
        prefix = ids + truth[:pos]
        budget = min(k, limit - len(prefix) - 1)
        guess = []
        for _ in range(budget):
            nxt = int(draft(torch.tensor([prefix + guess])).logits[0, -1].argmax())
            guess.append(nxt)
            if nxt == eos:
                break
        n = 0
        while n < len(guess) and pos + n < len(truth) and guess[n] == truth[pos + n]:
            n += 1
        proposed, accepted, forwards = proposed + len(guess), accepted + n, forwards + 1
        rejections += n < len(guess)
        pos = min(pos + n + 1, len(truth))  # n accepted + the target's own token (none after EOS / the limit)
    return {
        "proposed": proposed,
        "accepted": accepted,
        "rejections": rejections,
        "forwards": forwards,
        "new_tokens": len(truth),
    }


def test_identical_draft_is_always_accepted(target, tok):
    report = evaluate_draft(target, copy.deepcopy(target), tok, PROMPTS, max_new_tokens=15, num_assistant_tokens=4)
    assert report.identical and report.mismatched_prompts == []
    assert report.acceptance_rate == report.token_acceptance_rate == 1.0 and report.rejections == 0
    assert report.accepted_tokens == report.proposed_tokens > 0
    assert report.mean_accepted_tokens == 5.0  # 4 accepted + 1 of the target's own per forward: 3 forwards of 5
    assert report.new_tokens == sum(len(o) for o in report.target_outputs) == 4 * 15
    assert not report.universal_assisted_generation


def test_random_draft_counts_match_a_step_by_step_reference(target, tok):
    draft = make_llama(1, 32, seed=7).eval()
    k, n = 3, 10
    report = evaluate_draft(target, draft, tok, PROMPTS, max_new_tokens=n, num_assistant_tokens=k, warmup=False)
    assert report.identical  # greedy: the draft never changes the output
    expected = [reference_counts(target, draft, encode_prompt(tok, p), k, n) for p in PROMPTS]
    for got, want in zip(report.per_prompt, expected, strict=True):
        keys = ("proposed", "accepted", "rejections", "target_forwards", "new_tokens")
        assert [got[k] for k in keys] == [want["forwards" if k == "target_forwards" else k] for k in keys]
    assert 0.0 <= report.acceptance_rate < 1.0
    assert report.acceptance_rate == pytest.approx(report.accepted_tokens / report.proposed_tokens)
    checked = report.accepted_tokens + report.rejections
    assert report.acceptance_rate <= report.token_acceptance_rate == pytest.approx(report.accepted_tokens / checked)
    assert report.mean_accepted_tokens == pytest.approx(report.new_tokens / report.target_forwards)
    assert report.reported_matches == report.accepted_tokens  # no round ended at EOS here


def test_a_round_ending_at_eos_counts_the_accepted_eos(target, tok):
    """transformers counts an accepted draft EOS as the target's own token (`num_matches` one short); we do not."""
    ids = torch.tensor([encode_prompt(tok, PROMPTS[0])])
    free = target.generate(ids, do_sample=False, max_new_tokens=8, pad_token_id=0)[0, ids.shape[1] :].tolist()
    target.generation_config.eos_token_id = free[2]  # the target's greedy output now ends at its 3rd token
    first = free.index(free[2]) + 1
    draft = copy.deepcopy(target)
    report = evaluate_draft(target, draft, tok, PROMPTS[:1], max_new_tokens=8, num_assistant_tokens=5, warmup=False)
    assert report.target_outputs[0] == free[:first] and report.identical
    assert report.acceptance_rate == 1.0 and report.proposed_tokens == first
    assert report.reported_matches == report.accepted_tokens - 1


PER_PROMPT = ("proposed", "accepted", "rejections", "target_forwards", "new_tokens")  # `evaluate_draft`'s per_prompt


def assisted_vs_teacher_forced(target, draft, tok, k: int, max_new_tokens: int) -> tuple[list, list, object]:
    """Per prompt, `count_acceptance`'s counts from real assisted generation (`evaluate_draft`) and
    `greedy_acceptance`'s from the target's outputs, as tuples of `PER_PROMPT`; and the report."""
    report = evaluate_draft(
        target, draft, tok, PROMPTS, max_new_tokens=max_new_tokens, num_assistant_tokens=k, warmup=False
    )
    assert report.identical  # the precondition of exactness
    eos = target.generation_config.eos_token_id
    real, simulated = [], []
    for prompt, output, row in zip(PROMPTS, report.target_outputs, report.per_prompt, strict=True):
        counts = greedy_acceptance(
            draft, [encode_prompt(tok, prompt)], [output], k, max_new_tokens=max_new_tokens, eos_token_id=eos
        )
        simulated.append(tuple(getattr(counts, name) for name in PER_PROMPT))
        real.append(tuple(row[name] for name in PER_PROMPT))
    assert sum(r[0] for r in real) == report.proposed_tokens
    return real, simulated, report


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("draft_kind", ["copy", "cut"])
def test_teacher_forced_acceptance_equals_assisted_decoding(target, tok, draft_kind, k):
    """A copy (all accepted) and a 1-layer cut of the 2-layer target (mismatches): per prompt, every count equal.
    15 new tokens: the last rounds are capped by the length limit (k=1: nothing proposed at the last position)."""
    draft = copy.deepcopy(target) if draft_kind == "copy" else init_student_from_teacher(target, num_layers=1).eval()
    real, simulated, report = assisted_vs_teacher_forced(target, draft, tok, k, max_new_tokens=15)
    assert simulated == real
    total = greedy_acceptance(
        draft, [encode_prompt(tok, p) for p in PROMPTS], report.target_outputs, k, max_new_tokens=15, eos_token_id=3
    )
    assert (total.reported_matches, total.acceptance_rate) == (report.reported_matches, report.acceptance_rate)
    if draft_kind == "copy":
        assert total.acceptance_rate == 1.0 and total.rejections == 0
    else:
        assert 0.0 < total.acceptance_rate < 1.0 and total.rejections > 0
    assert total.proposed < k * total.target_forwards  # the length limit cut the last round short (k=1: to none)


def test_teacher_forced_acceptance_at_eos(target, tok, monkeypatch):
    """Outputs ending at an EOS before the limit (the target's EOS ids [3, 13]: 13 is a token it generates): an
    accepted EOS (reported_matches one short), an EOS as the target's own token, and a round where the draft's own
    continuation after a rejected token reaches an EOS, which ends its proposal early."""
    target.generation_config.eos_token_id = [3, 13]
    draft = init_student_from_teacher(target, num_layers=1).eval()
    real, simulated, report = assisted_vs_teacher_forced(target, draft, tok, 5, max_new_tokens=15)
    lengths = [len(o) for o in report.target_outputs]
    assert min(lengths) < 15 and all(o[-1] == 13 for o in report.target_outputs if len(o) < 15)
    assert simulated == real
    ids = [encode_prompt(tok, p) for p in PROMPTS]
    by_k = greedy_acceptance(draft, ids, report.target_outputs, [1, 3, 5], max_new_tokens=15, eos_token_id=[3, 13])
    assert set(by_k) == {1, 3, 5}
    assert (by_k[5].reported_matches, by_k[5].accepted) == (report.reported_matches, report.accepted_tokens)
    assert report.reported_matches < report.accepted_tokens  # an accepted EOS
    for k in (1, 3):  # one forward serves every k
        alone = greedy_acceptance(draft, ids, report.target_outputs, k, max_new_tokens=15, eos_token_id=[3, 13])
        assert alone == by_k[k]
    # the branch forwards over the cache agree with plain forwards over each branch's whole sequence
    monkeypatch.setattr("hf_distill.draft_acceptance._plain_cache", lambda cache: False)
    assert greedy_acceptance(draft, ids, report.target_outputs, 5, max_new_tokens=15, eos_token_id=[3, 13]) == by_k[5]
    # and they matter here: without the off-track EOS one more token would count as proposed
    monkeypatch.setattr(
        "hf_distill.draft_acceptance._off_track_eos", lambda draft, ids, cache, starts, *rest: [None] * len(starts)
    )
    blind = greedy_acceptance(draft, ids, report.target_outputs, 5, max_new_tokens=15, eos_token_id=[3, 13])
    assert blind.proposed > report.proposed_tokens and blind.accepted == report.accepted_tokens


def test_teacher_forced_acceptance_checks_its_inputs(target, tok):
    draft = copy.deepcopy(target)
    ids = [encode_prompt(tok, PROMPTS[0])]
    output = target.generate(torch.tensor(ids), do_sample=False, max_new_tokens=6, pad_token_id=0)[0, len(ids[0]) :]
    counts = greedy_acceptance(draft, ids, [output.tolist()], 2, max_new_tokens=6)
    assert counts == AcceptanceCounts(proposed=4, accepted=4, reported_matches=4, target_forwards=2, new_tokens=6)
    assert draft.training is False
    with pytest.raises(ValueError, match="without an EOS"):  # generated with another limit
        greedy_acceptance(draft, ids, [output.tolist()], 2, max_new_tokens=8, eos_token_id=3)
    with pytest.raises(ValueError, match="EOS at"):  # an EOS inside the output: not the target's greedy output
        greedy_acceptance(draft, ids, [output.tolist()], 2, max_new_tokens=6, eos_token_id=output[0].item())
    with pytest.raises(ValueError, match=">= 1"):
        greedy_acceptance(draft, ids, [output.tolist()], [0, 2], max_new_tokens=6)


def test_count_acceptance_restores_the_model(target, tok):
    draft = copy.deepcopy(target)
    ids = torch.tensor([encode_prompt(tok, PROMPTS[1])])
    with count_acceptance(target) as counts:
        assert "_get_candidate_generator" in target.__dict__
        target.generate(ids, assistant_model=draft, do_sample=False, max_new_tokens=6, pad_token_id=0)
    assert "_get_candidate_generator" not in target.__dict__
    assert counts.target_forwards >= 1 and counts.new_tokens == 6
    settings = draft.generation_config.to_dict()
    evaluate_draft(target, draft, tok, PROMPTS[:1], max_new_tokens=4, num_assistant_tokens=2)
    assert draft.generation_config.to_dict() == settings  # the draft's own settings are put back

    def heuristic_tokens_after(observed: bool) -> int:  # transformers' own bookkeeping still runs when counted
        helper = copy.deepcopy(target)
        helper.generation_config.num_assistant_tokens_schedule = "heuristic"
        helper.generation_config.num_assistant_tokens = 2
        with count_acceptance(target) if observed else contextlib.nullcontext():
            target.generate(ids, assistant_model=helper, do_sample=False, max_new_tokens=9, pad_token_id=0)
        return helper.generation_config.num_assistant_tokens

    assert heuristic_tokens_after(True) == heuristic_tokens_after(False) > 2


def test_another_tokenizer_goes_through_universal_assisted_generation(target, tok):
    other = make_tokenizer([*reversed(WORDS), "green", "tree"])  # other ids, and a vocabulary of another size
    assert not same_vocabulary(tok, other) and same_vocabulary(tok, make_tokenizer())
    draft = make_llama(1, 32, vocab_size=len(other), seed=3).eval()
    report = evaluate_draft(
        target, draft, tok, PROMPTS[:2], draft_tokenizer=other, max_new_tokens=8, num_assistant_tokens=3
    )
    assert report.universal_assisted_generation and report.identical
    assert 0.0 <= report.acceptance_rate <= 1.0 and report.target_forwards >= 1
    assert report.new_tokens == sum(p["new_tokens"] for p in report.per_prompt)


def test_chat_template_and_prompts(tok):
    assert encode_prompt(tok, "the cat")[0] == tok.convert_tokens_to_ids("<|im_start|>")  # template applied
    plain = make_tokenizer(chat_template=False)
    assert encode_prompt(plain, "the cat") == plain("the cat")["input_ids"]
    rows = [{"q": "the cat", "a": "the dog"}, {"q": "a mat", "a": "a cat"}]
    assert prompts_from_dataset(rows, "q") == ["the cat", "a mat"]
    assert prompts_from_dataset(rows, prompt_template="{q} and {a}", limit=1) == ["the cat and the dog"]
    with pytest.raises(ValueError, match="no column 'x'"):
        prompts_from_dataset(rows, "x")
    with pytest.raises(ValueError, match="exactly one"):
        prompts_from_dataset(rows)


@pytest.fixture
def tiny_files(tmp_path, tok):
    for name, model in {"target": make_llama(2, 32, seed=0), "draft": make_llama(1, 32, seed=5)}.items():
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    rows = [{"question": p, "id": i} for i, p in enumerate(PROMPTS)]
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return tmp_path


def test_cli_end_to_end(tiny_files, capsys):
    out = tiny_files / "report" / "draft.json"
    main(
        ["draft", "evaluate", "--target", str(tiny_files / "target"), "--draft", str(tiny_files / "draft"),
         "--dataset", str(tiny_files / "prompts.jsonl"), "--prompt_column", "question", "--max_new_tokens", "6",
         "--limit", "3", "--num_assistant_tokens", "2", "--output", str(out)]
    )  # fmt: skip
    report = json.loads(out.read_text())
    assert REPORT_FIELDS <= set(report) and report["identical"] is True
    assert report["num_prompts"] == 3 and report["new_tokens"] == 18
    assert report["settings"]["num_assistant_tokens"] == 2
    assert report["speedup"] > 0 and report["target_tokens_per_s"] > 0 and "per_prompt" not in report
    assert "speed-up" in capsys.readouterr().out
    # the draft is the target itself: every proposed token accepted
    main(
        ["draft", "evaluate", "--target", str(tiny_files / "target"), "--draft", str(tiny_files / "target"),
         "--dataset", str(tiny_files / "prompts.jsonl"), "--prompt_template", "{question}", "--max_new_tokens", "6",
         "--output", str(out), "--per_prompt", "true", "--update_card", "true"]
    )  # fmt: skip
    report = json.loads(out.read_text())
    assert report["acceptance_rate"] == 1.0 and len(report["per_prompt"]) == 4
    card = (tiny_files / "target" / "README.md").read_text()  # the draft's card names its target and the results
    assert "speculative-decoding" in card and f"with **`{tiny_files / 'target'}`** as the target" in card
    assert "| acceptance rate (accepted / proposed draft tokens) | 1.000 |" in card


def test_draft_card_keeps_the_trainer_card(tmp_path):
    from hf_distill.model_card import add_draft_results, build_model_card

    build_model_card(
        model_name="d", teacher="smollm2", student_description="4 layers", losses={"kd_loss": "tvd"}
    ).save(tmp_path / "README.md")
    report = {
        "acceptance_rate": 0.5,
        "token_acceptance_rate": 0.6,
        "mean_accepted_tokens": 2.0,
        "speedup": 1.25,
        "target_tokens_per_s": 4.0,
        "assisted_tokens_per_s": 5.0,
        "identical": True,
        "num_prompts": 3,
        "settings": {"max_new_tokens": 8},
    }
    add_draft_results(str(tmp_path), report, "smollm2")
    add_draft_results(str(tmp_path), {**report, "speedup": 1.5}, "smollm2")  # replaced, not appended
    card = (tmp_path / "README.md").read_text()
    assert card.count("## Speculative decoding") == 1 and "| speed-up over the target alone | 1.50x |" in card
    assert "## Distillation settings" in card and "| `kd_loss` | tvd |" in card and "- draft-model" in card


def test_cli_errors(tiny_files, capsys):
    with pytest.raises(SystemExit) as err:
        main(
            ["draft", "evaluate", "--target", str(tiny_files / "target"), "--draft", str(tiny_files / "draft"),
             "--dataset", str(tiny_files / "prompts.jsonl")]
        )  # fmt: skip
    assert err.value.code == 1 and "--prompt_column" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        main(["draft", "speculate"])
    assert err.value.code == 2


def test_help():
    def cli(*args: str) -> str:
        cmd = [sys.executable, "-m", "hf_distill.cli.main", *args]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout

    assert "draft" in cli("--help")
    assert "evaluate" in cli("draft", "--help")
    out = cli("draft", "evaluate", "--help")
    for flag in ("--target", "--draft", "--dataset", "--prompt_column", "--max_new_tokens", "--limit",
                 "--num_assistant_tokens", "--output"):  # fmt: skip
        assert flag in out


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes" / "draft").glob("*.yaml")), ids=lambda p: p.name)
def test_draft_recipes_parse(recipe):
    from hf_distill.cli.train import make_parser

    script_args, args, _ = make_parser().parse_args_and_config(["--config", str(recipe), "--output_dir", "/tmp/x"])
    assert recipe.read_text().startswith("#") and script_args.dataset_name and args.output_dir == "/tmp/x"
    if recipe.stem.endswith("_tvd"):  # the default divergence of a draft (docs/draft_models.md)
        assert args.kd_loss == "tvd" and args.kd_weight == 1.0 and args.ce_weight == 0.0 and args.lmbda > 0
    if recipe.stem.endswith("_ce"):
        assert args.kd_weight == 0.0 and args.seq_kd
