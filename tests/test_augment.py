"""``--augment``: the data-level baselines that use CC-Tuning's parallel information (docs/data.md,
"Augmented records"). The records the trainer sees are compared with records written out by hand,
the loss masks with a tokenisation of hand-written ChatML text, and a bilingual-prompt model's
inference with an ``augment none`` model of the same weights given hand-written bilingual prompts."""

import json
import logging
import shutil

import pytest

from cctuning.cli import main
from cctuning.data.augment import (
    AUGMENTS,
    augment_records,
    bilingual_instruction,
    inference_instruction,
    inference_instructions,
)
from cctuning.data.encoding import IGNORE_INDEX
from cctuning.data.records import Record, load_records
from cctuning.errors import CCError
from cctuning.training import TrainConfig, train
from cctuning.training.args import OPTION_GROUPS
from cctuning.training.run import prepare
from tests.conftest import flags, write_jsonl

ROWS = [
    {
        "instruction": "Habari ya asubuhi?",
        "output": "Nzuri sana.",
        "instruction_en": "Good morning?",
        "lang": "sw",
    },
    {
        "instruction": "Good evening?",
        "output": "Very well.",
        "lang": "en",
    },  # English: no instruction_en needed
    {
        "instruction": "请回答问题。",
        "output": "今天天气很好。",
        "instruction_en": "Answer the question.",
        "lang": "zh",
    },
    {"instruction": "Same text", "output": "Same answer.", "instruction_en": "Same text"},  # English: equal
]


def _records(tmp_path, rows=ROWS) -> list[Record]:
    return load_records(write_jsonl(tmp_path / "train.jsonl", rows), require_english=False)


def _plain(records) -> list[tuple]:
    """What the trainer reads of a record: instruction, output, instruction_en, lang, and its line."""
    return [(r.instruction, r.output, r.instruction_en, r.lang, r.line) for r in records]


def test_the_api_and_the_flag_agree():
    assert AUGMENTS == ("none", "english-prompt", "bilingual-prompt")
    assert tuple(TrainConfig.__dataclass_fields__["augment"].metadata["choices"]) == AUGMENTS
    assert TrainConfig().augment == "none" and "augment" in OPTION_GROUPS["common options"]
    assert bilingual_instruction("Habari?", "Hello?") == "Hello?\n\nHabari?"


def test_the_records_the_trainer_sees(tmp_path):
    records = _records(tmp_path)
    assert _plain(augment_records(records, "none")) == _plain(records)
    assert _plain(augment_records(records, "english-prompt")) == [
        ("Habari ya asubuhi?", "Nzuri sana.", "Good morning?", "sw", 1),
        ("Good morning?", "Nzuri sana.", "Good morning?", "sw", 1),
        ("Good evening?", "Very well.", None, "en", 2),
        ("请回答问题。", "今天天气很好。", "Answer the question.", "zh", 3),
        ("Answer the question.", "今天天气很好。", "Answer the question.", "zh", 3),
        ("Same text", "Same answer.", "Same text", None, 4),
    ]
    assert _plain(augment_records(records, "bilingual-prompt")) == [
        ("Good morning?\n\nHabari ya asubuhi?", "Nzuri sana.", "Good morning?", "sw", 1),
        ("Good evening?", "Very well.", None, "en", 2),
        ("Answer the question.\n\n请回答问题。", "今天天气很好。", "Answer the question.", "zh", 3),
        ("Same text", "Same answer.", "Same text", None, 4),
    ]


def test_a_non_english_record_without_its_english_is_a_one_line_error(tmp_path):
    rows = ROWS[:2] + [{"instruction": "Привет?", "output": "Хорошо.", "lang": "ru"}]
    records = _records(tmp_path, rows)
    for mode in ("english-prompt", "bilingual-prompt"):
        with pytest.raises(CCError) as err:
            augment_records(records, mode)
        assert str(err.value).startswith(f"{tmp_path / 'train.jsonl'}:3: field 'instruction_en': missing")
        assert "\n" not in str(err.value)
    with pytest.raises(CCError, match="--augment: unknown mode 'both'"):
        augment_records(records, "both")


def test_a_bad_augment_value_is_a_one_line_error(tmp_path, base_dir, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    with pytest.raises(SystemExit):
        main(["train", *flags(model=base_dir, data=data, output=tmp_path / "o", augment="both")])
    err = capsys.readouterr().err.strip().splitlines()
    assert "--augment" in err[-1] and "invalid choice: 'both'" in err[-1]
    with pytest.raises(
        CCError, match=r"^--augment: unknown mode 'x' \(use none, english-prompt, bilingual-prompt\)$"
    ):
        train(TrainConfig(model=str(base_dir), data=str(data), output=str(tmp_path / "p"), augment="x"))
    config = tmp_path / "exp.yaml"
    config.write_text("cells:\n  - {name: a, method: sft}\n  - {name: b, method: sft, augment: both}\n")
    from cctuning.lab.experiment import load_config

    with pytest.raises(CCError) as err:
        load_config(config)
    assert str(err.value) == (
        f"{config}: cell 'b': option 'augment': expected one of none, english-prompt, bilingual-prompt, got 'both'"
    )


def _chatml_ids(tokenizer, instruction: str) -> list[int]:
    """The prompt as the tiny tokenizer's ChatML template renders it, written out by hand."""
    text = f"<s><|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n"
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# (mode, method): the prompt of each example, and (with cc) its English pass's prompt
EXPECTED = {
    "english-prompt": [
        ("Habari ya asubuhi?", "Nzuri sana."),
        ("Good morning?", "Nzuri sana."),
        ("Good evening?", "Very well."),
        ("请回答问题。", "今天天气很好。"),
        ("Answer the question.", "今天天气很好。"),
        ("Same text", "Same answer."),
    ],
    "bilingual-prompt": [
        ("Good morning?\n\nHabari ya asubuhi?", "Nzuri sana."),
        ("Good evening?", "Very well."),
        ("Answer the question.\n\n请回答问题。", "今天天气很好。"),
        ("Same text", "Same answer."),
    ],
}
ENGLISH_PASS = {
    "english-prompt": [
        "Good morning?",
        "Good morning?",
        "Good evening?",
        "Answer the question.",
        "Answer the question.",
        "Same text",
    ],
    "bilingual-prompt": ["Good morning?", "Good evening?", "Answer the question.", "Same text"],
}


@pytest.mark.parametrize("method", ["sft", "cc"])
@pytest.mark.parametrize("mode", ["english-prompt", "bilingual-prompt"])
def test_the_loss_masks_cover_exactly_the_responses(tmp_path, base_dir, tokenizer, mode, method):
    rows = [dict(r) for r in ROWS]
    rows[1]["instruction_en"] = "Good evening?"  # --method cc needs it on every record
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = TrainConfig(
        model=str(base_dir), data=str(data), output=str(tmp_path / "o"), method=method, augment=mode
    )
    model, _, dataset, _, stats = prepare(cfg)
    assert model.cc_config.augment == mode and stats.examples == len(EXPECTED[mode])
    for feature, (instruction, output), english in zip(
        dataset, EXPECTED[mode], ENGLISH_PASS[mode], strict=True
    ):
        prompt = _chatml_ids(tokenizer, instruction)
        response = tokenizer(f"{output}<|im_end|>\n", add_special_tokens=False)["input_ids"]
        assert feature["input_ids"] == prompt + response
        assert [t for t in feature["labels"] if t != IGNORE_INDEX] == response
        assert feature["labels"] == [IGNORE_INDEX] * len(prompt) + response
        assert feature["cc_position"] == len(prompt) - 1
        if method == "cc":
            assert feature["en_input_ids"] == _chatml_ids(tokenizer, english)
        else:
            assert "en_input_ids" not in feature


def test_inference_prompts_with_the_english_and_says_when_it_falls_back(caplog):
    assert inference_instruction("Habari?", "Hello?", "bilingual-prompt") == "Hello?\n\nHabari?"
    assert inference_instruction("Habari?", "Hello?", "english-prompt") == "Habari?"
    assert inference_instruction("Habari?", None, "bilingual-prompt") == "Habari?"
    assert inference_instruction("Hello?", "Hello?", "bilingual-prompt") == "Hello?"  # English itself
    assert inference_instruction("Hi?", "Hello?", "bilingual-prompt", lang="en") == "Hi?"
    with caplog.at_level(logging.WARNING, logger="cctuning"):
        texts, missing = inference_instructions(
            ["Habari?", "Salut?", "Hi?"],
            ["Hello?", None, None],
            "bilingual-prompt",
            "f.jsonl",
            ["sw", "fr", "en"],
        )
    assert texts == ["Hello?\n\nHabari?", "Salut?", "Hi?"] and missing == 1
    assert "f.jsonl: 1 of 3 prompts have no English instruction at hand" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cctuning"):
        assert inference_instructions(["Salut?"], None, "english-prompt", "f.jsonl") == (["Salut?"], 0)
    assert caplog.text == ""


def test_the_experiment_cells_with_augment(tmp_path):
    from cctuning.lab.experiment import load_config
    from cctuning.lab.experiment.config import resolve_cells
    from cctuning.lab.experiment.reuse import _stage_settings

    config = tmp_path / "exp.yaml"
    config.write_text(
        "train: {max_steps: 2}\ncells:\n"
        "  - {name: sft, method: sft}\n"
        "  - {name: sft-none, method: sft, augment: none}\n"
        "  - {name: english-prompt, method: sft, augment: english-prompt}\n"
        "  - {name: bilingual-prompt, method: sft, augment: bilingual-prompt}\n"
        "  - {name: bilingual-prompt-no-english, method: sft, augment: bilingual-prompt, withhold_english: true}\n"
        "  - {name: cc-bilingual, method: cc, augment: bilingual-prompt, connection: transform}\n"
    )
    cfg = load_config(config)
    cells = {c.name: c for c in resolve_cells(cfg)}
    keys = {name: c.train_name for name, c in cells.items()}
    assert keys["sft"] == keys["sft-none"]  # augment none is the default: the same training
    assert keys["bilingual-prompt"] == keys["bilingual-prompt-no-english"]  # evaluated apart, trained once
    assert len({keys["sft"], keys["english-prompt"], keys["bilingual-prompt"], keys["cc-bilingual"]}) == 4
    assert cells["english-prompt"].options == {"max_steps": 2, "method": "sft", "augment": "english-prompt"}
    assert (
        cells["bilingual-prompt-no-english"].withhold_english
        and not cells["bilingual-prompt"].withhold_english
    )
    # withhold_english is an evaluation setting, recorded only where it is set (earlier results keep theirs)
    assert _stage_settings(cfg, cells["bilingual-prompt-no-english"], 1, "nll")["withhold_english"] is True
    assert "withhold_english" not in _stage_settings(cfg, cells["bilingual-prompt"], 1, "nll")
    config.write_text("cells:\n  - {name: a, method: sft, withhold_english: maybe}\n")
    with pytest.raises(CCError, match="cell 'a': option 'withhold_english': expected bool"):
        load_config(config)


HELD = [
    {"instruction": "Habari ya jioni?", "output": "Nzuri.", "instruction_en": "Good evening?", "lang": "sw"},
    {"instruction": "你好吗？", "output": "很好。", "instruction_en": "How are you?", "lang": "zh"},
    {"instruction": "Привет?", "output": "Хорошо.", "lang": "ru"},  # no English at hand
    {"instruction": "Hello?", "output": "Fine.", "instruction_en": "Hello?", "lang": "en"},
]
# the same records with the prompt a bilingual-prompt model gets, written out by hand
HELD_BILINGUAL = [
    {**HELD[0], "instruction": "Good evening?\n\nHabari ya jioni?"},
    {**HELD[1], "instruction": "How are you?\n\n你好吗？"},
    HELD[2],
    HELD[3],
]


def _sums(report_dir) -> list[float]:
    from cctuning.eval.nll import load_items

    return [round(i["nll_sum"], 5) for i in load_items(report_dir)]


@pytest.fixture(scope="module")
def bilingual_run(tmp_path_factory, base_dir):
    """A tiny SFT run trained with --augment bilingual-prompt (one step), and a copy of it that says it
    was trained without --augment: the same weights, prompted with the instruction as it is."""
    tmp = tmp_path_factory.mktemp("bilingual")
    data = write_jsonl(tmp / "train.jsonl", ROWS)
    out = tmp / "run"
    options = dict(model=base_dir, data=data, output=out, method="sft", augment="bilingual-prompt")
    assert main(["train", *flags(**options, max_steps=1, batch_size=2)]) == 0
    plain = tmp / "plain"
    shutil.copytree(out, plain)
    config = json.loads((plain / "cctuning_config.json").read_text())
    (plain / "cctuning_config.json").write_text(json.dumps({**config, "augment": "none"}))
    return out, plain


def test_a_saved_model_carries_the_mode_and_the_nll_prompts_with_the_english(tmp_path, bilingual_run, caplog):
    from cctuning.eval.nll import evaluate_nll
    from cctuning.loading import load_for_inference

    out, _ = bilingual_run
    assert json.loads((out / "cctuning_config.json").read_text())["augment"] == "bilingual-prompt"
    results = json.loads((out / "train_results.json").read_text())
    assert (
        results["records"] == 4
        and results["examples"] == 4
        and results["config"]["augment"] == "bilingual-prompt"
    )
    held = write_jsonl(tmp_path / "held.jsonl", HELD)
    by_hand = write_jsonl(tmp_path / "held_bilingual.jsonl", HELD_BILINGUAL)
    model, tok, _ = load_for_inference(str(out))
    assert model.cc_config.augment == "bilingual-prompt"
    with caplog.at_level(logging.WARNING, logger="cctuning"):
        report = evaluate_nll(model, tok, held, "none", tmp_path / "given", progress=False)
    assert f"{held}: 1 of 4 prompts have no English instruction at hand" in caplog.text
    assert report["augment"] == "bilingual-prompt" and report["prompts_without_english"] == 1
    assert report["english_withheld"] is False
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cctuning"):
        withheld = evaluate_nll(
            model, tok, held, "none", tmp_path / "withheld", progress=False, withhold_english=True
        )
    assert f"{held}: 3 of 4 prompts have no English instruction at hand" in caplog.text
    assert withheld["english_withheld"] is True and withheld["prompts_without_english"] == 3
    # the same weights as a model trained without --augment, given the prompts written out by hand
    model.cc_config.augment = "none"
    plain = evaluate_nll(model, tok, by_hand, "none", tmp_path / "by-hand", progress=False)
    assert plain["augment"] == "none" and "prompts_without_english" not in plain
    evaluate_nll(model, tok, held, "none", tmp_path / "alone", progress=False)
    assert _sums(tmp_path / "given") == _sums(tmp_path / "by-hand")
    assert _sums(tmp_path / "withheld") == _sums(tmp_path / "alone")
    assert _sums(tmp_path / "given")[:2] != _sums(tmp_path / "alone")[:2]


@pytest.mark.parametrize("connection", ["english", "transform"])
def test_a_bilingual_cc_model_prompts_with_the_english_and_its_english_pass_reads_it_alone(
    tmp_path, tokenizer, connection
):
    from cctuning.eval.nll import evaluate_nll
    from tests.conftest import connected_model

    rows = [r for r in HELD if "instruction_en" in r]
    held = write_jsonl(tmp_path / "held.jsonl", rows)
    by_hand = write_jsonl(tmp_path / "by_hand.jsonl", [r for r in HELD_BILINGUAL if "instruction_en" in r])
    cc = connected_model(tokenizer)
    cc.cc_config.augment = "bilingual-prompt"
    evaluate_nll(cc, tokenizer, held, connection, tmp_path / "bilingual", progress=False)
    cc.cc_config.augment = "none"
    evaluate_nll(cc, tokenizer, by_hand, connection, tmp_path / "by-hand", progress=False)
    evaluate_nll(cc, tokenizer, held, connection, tmp_path / "alone", progress=False)
    assert _sums(tmp_path / "bilingual") == _sums(tmp_path / "by-hand") != _sums(tmp_path / "alone")


def _first_logprobs(folder, lang: str) -> dict:
    """The option labels' log-probabilities of each item of ``lang`` that ``eval`` cached, by id."""
    rows = [
        json.loads(line)
        for line in (folder / "generations" / "XNLI" / f"{lang}.jsonl").read_text().splitlines()
    ]
    return {str(r["id"]): {k: round(v, 4) for k, v in r["logprobs"].items()} for r in rows}


def test_eval_on_benchmarks_prompts_with_the_items_english(tmp_path, tokenizer, caplog):
    from cctuning.eval.benchmarks import load_benchmark
    from cctuning.eval.runner import EvalConfig, evaluate
    from tests.conftest import connected_model

    by_hand = tmp_path / "data"
    for lang in ("en", "sw"):
        items = load_benchmark("XNLI", lang, None, 2)
        rows = [
            {
                "id": it.id,
                "prompt": it.prompt if lang == "en" else f"{it.prompt_en}\n\n{it.prompt}",
                "answer": it.answer,
                "prompt_en": it.prompt_en,
            }
            for it in items
        ]
        (by_hand / "XNLI").mkdir(parents=True, exist_ok=True)
        write_jsonl(by_hand / "XNLI" / f"{lang}.jsonl", rows)
    cc = connected_model(tokenizer)

    def run(name, augment, **options):
        cc.cc_config.augment = augment
        spec = dict(benchmarks=["XNLI"], langs=["en", "sw"], limit=2, scoring="likelihood", connection="none")
        return evaluate(
            EvalConfig(model="m", output=str(tmp_path / name), **spec, **options),
            cc,
            tokenizer,
            progress=False,
        )

    given = run("given", "bilingual-prompt")
    assert given["augment"] == "bilingual-prompt" and given["prompts_without_english"] == 0
    with caplog.at_level(logging.WARNING, logger="cctuning"):
        withheld = run("withheld", "bilingual-prompt", withhold_english=True)
    assert (
        withheld["english_withheld"] is True and withheld["prompts_without_english"] == 2
    )  # sw; en is English
    assert "eval: 2 of 4 prompts have no English instruction at hand" in caplog.text
    run("by-hand", "none", data_dir=str(by_hand))
    run("alone", "none")
    for lang in ("en", "sw"):
        assert _first_logprobs(tmp_path / "given", lang) == _first_logprobs(tmp_path / "by-hand", lang)
        assert _first_logprobs(tmp_path / "withheld", lang) == _first_logprobs(tmp_path / "alone", lang)
    assert _first_logprobs(tmp_path / "given", "en") == _first_logprobs(tmp_path / "alone", "en")
    assert _first_logprobs(tmp_path / "given", "sw") != _first_logprobs(tmp_path / "alone", "sw")


def test_generate_prompts_with_the_english_and_says_when_it_falls_back(tmp_path, bilingual_run, capsys):
    out, plain = bilingual_run
    short = ["--max-new-tokens", "6"]
    assert (
        main(["generate", "--model", str(out), "--prompt", "Habari?", "--prompt-en", "Hello?", *short]) == 0
    )
    given = capsys.readouterr()
    assert "bilingual-prompt model: 0 of 1 prompts without the English" in given.err
    assert main(["generate", "--model", str(plain), "--prompt", "Hello?\n\nHabari?", *short]) == 0
    assert capsys.readouterr().out == given.out
    held = write_jsonl(tmp_path / "held.jsonl", HELD)
    for extra in ([], ["--withhold-english"]):
        assert (
            main(
                [
                    "generate",
                    "--model",
                    str(out),
                    "--input",
                    str(held),
                    "--output",
                    str(tmp_path / "g.jsonl"),
                    *short,
                    *extra,
                ]
            )
            == 0
        )
        printed = capsys.readouterr().out
        rows = [json.loads(line) for line in (tmp_path / "g.jsonl").read_text().splitlines()]
        prompts = [r["prompt"] for r in rows]
        if extra:
            assert (
                prompts == [r["instruction"] for r in HELD]
                and "3 of 4 prompts without the English (--withhold-english)" in printed
            )
        else:
            assert prompts == [r["instruction"] for r in HELD_BILINGUAL]
            assert "1 of 4 prompts without the English (no English at hand)" in printed
        assert [r["bilingual"] for r in rows] == [p != r["instruction"] for p, r in zip(prompts, HELD)]
        assert all(r["augment"] == "bilingual-prompt" for r in rows)


def test_lm_eval_gives_the_documents_english(tokenizer, caplog):
    from lm_eval.api.instance import Instance

    from cctuning.eval.lmeval import CCLM
    from tests.conftest import connected_model

    cc = connected_model(tokenizer)
    lm = CCLM(pretrained=cc, tokenizer=tokenizer, device="cpu", connection="none", batch_size=4)
    render = lambda text: lm.encoder.render_prompt(text)[0]  # noqa: E731
    docs = [
        {
            "prompt": r["instruction"],
            "lang": r["lang"],
            **({"prompt_en": r["instruction_en"]} if "instruction_en" in r else {}),
        }
        for r in HELD
    ]

    def ask(kind, texts, second, augment, withhold=False):
        cc.cc_config.augment = augment
        lm.withhold_english = withhold
        reqs = [
            Instance(kind, d, (render(t), second), idx=0, metadata=("t", i, 1))
            for i, (d, t) in enumerate(zip(docs, texts))
        ]
        return lm.loglikelihood(reqs) if kind == "loglikelihood" else lm.generate_until(reqs)

    alone = [r["instruction"] for r in HELD]
    by_hand = [r["instruction"] for r in HELD_BILINGUAL]
    for kind, second in (("loglikelihood", " Nzuri."), ("generate_until", {"until": [], "max_gen_toks": 4})):
        with caplog.at_level(logging.WARNING, logger="cctuning"):
            given = ask(kind, alone, second, "bilingual-prompt")
        assert "lm-eval: 1 of 4 prompts have no English instruction at hand" in caplog.text
        caplog.clear()
        assert given == ask(kind, by_hand, second, "none")
        if kind == "loglikelihood":
            assert given[:2] != ask(kind, alone, second, "none")[:2]
        assert ask(kind, alone, second, "bilingual-prompt", withhold=True) == ask(kind, alone, second, "none")
    cc.cc_config.augment = "bilingual-prompt"
    info = lm.get_model_info()
    assert info["augment"] == "bilingual-prompt" and info["prompts_without_english"] == 1 + 3 + 1 + 3
