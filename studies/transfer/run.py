"""A controlled transfer task where CC-Tuning's connection must help by construction.

``cctuning transfer-task`` builds a small synthetic world per seed (docs/transfer.md):

* **entities** with an English name and a foreign name (distinct tokens of a word-level
  vocabulary built locally), **relations** (``color``, ``size``, ...) with shared answer words,
  and one random value per (entity, relation): the **facts**;
* **stage 1** ("English knowledge"): a tiny Llama trained from scratch, through ``cctuning train
  --method sft``, on every fact asked and answered in English plus a bilingual **dictionary**
  (relation and function words, and a declared part of the entities, both directions);
* **stage 2** ("joint fine-tuning"): records in the official format (foreign ``instruction``,
  ``output``, English ``instruction_en``, ``lang``) for the facts of the *training* entities only,
  plus (by default) an English-only rehearsal of every fact so that the English pass keeps its
  knowledge; ``sft`` and ``cc`` are trained from the same stage-1 folder with the same data, seed
  and budget;
* **evaluation** on the facts of the *held-out* entities asked in the foreign language only:
  accuracy of the answer chosen among the relation's candidate words by teacher-forced likelihood
  (``cctuning.eval.nll.item_nll``, the package's connected path). Cells: SFT (connection
  ``none``), CC with the English oracle (``english``), CC with the Transform Matrix
  (``transform``, fitted by ``fit_transform_matrix`` on the stage-2 records) and CC without the
  connection (``none``).

A held-out entity's foreign name never occurs in stage 2 and its facts are never asked in the
foreign language; only the English pass knows them. The English prompt's FFN activations at p
carry the answer (stage 1 taught the model to predict it there), so a model that learned in
stage 2 to read the injected vector can answer held-out questions; SFT cannot, except through
the dictionary (for the entities it covers). ``summary.json`` reports every cell per seed
(Wilson 95% interval over items), the mean over seeds (95% t-interval) and items pooled over
seeds (independent worlds: Wilson interval), the oracle's paired margin over SFT, stage-1 English
accuracy, the Decision Maker's layer choices and the matrix's fit quality.
"""

from __future__ import annotations

import json
import logging
import random
import time
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from cctuning.errors import CCError
from cctuning.io import write_json, write_text
from cctuning.stats import accuracy_summary, mean_interval, paired_bootstrap_mean, wilson_interval

logger = logging.getLogger(__name__)

SUMMARY_NAME = "summary.json"
SUMMARY_MD_NAME = "summary.md"
FOREIGN_LANG = "xx"  # the synthetic foreign language's code in the records
CELLS = (  # (name in summary.json, trained method, connection at evaluation)
    ("sft", "sft", "none"),
    ("cc_oracle", "cc", "english"),
    ("cc_transform", "cc", "transform"),
    ("cc_none", "cc", "none"),
)

# answer words per relation (shared by both languages); a world uses the first `values` of each
RELATIONS = {
    "color": ["red", "blue", "green", "yellow", "black", "white", "pink", "brown", "gray", "purple"],
    "size": ["tiny", "small", "short", "medium", "tall", "large", "huge", "giant", "wide", "narrow"],
    "food": ["rice", "bread", "fish", "meat", "soup", "fruit", "cheese", "beans", "corn", "eggs"],
    "sport": ["chess", "tennis", "golf", "rugby", "boxing", "skiing", "rowing", "karate", "polo", "darts"],
    "season": ["spring", "summer", "autumn", "winter", "monsoon", "dawn", "dusk", "noon", "night", "harvest"],
    "metal": ["iron", "gold", "silver", "copper", "tin", "lead", "zinc", "nickel", "bronze", "steel"],
}
# English question: "what is the REL of X ?"; foreign question (head-final): "X FOF FREL FWHAT ?"
ENGLISH_FUNCTION = ("what", "is", "the", "of")
FOREIGN_FUNCTION = {"what": "ka", "of": "nu"}  # "is" and "the" have no foreign counterpart
DICTIONARY_WORDS = ("english", "foreign", "word", "for")  # of the dictionary prompts
TEMPLATE_WORDS = ("###", "Instruction", "Response", ":", "?")  # the plain prompt format, tokenised
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")

_EN_SYLLABLES = (
    "ba be bo da de di do fa fe fi ga go la le li lo ma me mi mo na ne no ra re ro sa se so ta te to".split()
)
_FO_SYLLABLES = "zhu qex vyl xo kwa tzi ghe yrr dzo ql wyx jho pfu ckz mbe ngo tlu vri hsa qoa".split()


def _opt(default, help: str, **meta):
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class TransferConfig:
    output: str | None = _opt(None, "output folder (summary.json, summary.md, one folder per seed)")
    seeds: int = _opt(3, "number of seeds (0..N-1) when --seed is not given")
    seed_list: list = field(default_factory=list, metadata={"cli": False})  # --seed S [S ...]
    # the world
    entities: int = _opt(48, "number of entities")
    relations: int = _opt(3, f"number of relations (at most {len(RELATIONS)})")
    values: int = _opt(6, "answer words per relation (chance accuracy is 1/values)")
    heldout_fraction: float = _opt(0.5, "fraction of entities held out of stage 2 (evaluated)")
    dictionary_fraction: float = _opt(
        0.5, "fraction of entities in the bilingual dictionary (stratified over train/held-out)"
    )
    # the model
    hidden_size: int = _opt(64, "hidden size of the tiny Llama")
    layers: int = _opt(4, "number of decoder layers")
    heads: int = _opt(4, "attention heads")
    # stage 1: English knowledge
    stage1_epochs: float = _opt(60.0, "stage-1 epochs")
    stage1_lr: float = _opt(3e-3, "stage-1 learning rate")
    # stage 2: joint fine-tuning (the same budget for sft and cc)
    stage2_epochs: float = _opt(12.0, "stage-2 epochs")
    stage2_lr: float = _opt(1e-3, "stage-2 learning rate")
    stage2_english: bool = _opt(
        True, "also rehearse every fact in English in stage 2 (keeps the English pass's knowledge)"
    )
    batch_size: int = _opt(16, "batch size of both stages")
    fusion: str | None = _opt(
        None, "fusion of the connection (passed to training when set; the default is the model's: add)"
    )
    train_options: dict = field(default_factory=dict, metadata={"cli": False})  # --train-option K=V
    # evaluation
    matrix_ridge: float = _opt(0.0, "ridge λ of the Transform Matrix fit")
    eval_batch_size: int = _opt(64, "evaluation batch size (sequences)")
    bootstrap_reps: int = _opt(1000, "bootstrap resamples of the paired margins")
    threads: int = _opt(
        1, "torch threads during the run (0: leave torch's setting; 1 is fastest for this tiny model)"
    )

    def seed_values(self) -> list[int]:
        return [int(s) for s in self.seed_list] if self.seed_list else list(range(self.seeds))

    def check(self) -> None:
        if not self.output:
            raise CCError("--output is required")
        if not self.seed_list and self.seeds < 1:
            raise CCError(f"--seeds must be >= 1, got {self.seeds}")
        if len(set(self.seed_values())) != len(self.seed_values()):
            raise CCError(f"--seed: repeated seeds {self.seed_values()}")
        if not 1 <= self.relations <= len(RELATIONS):
            raise CCError(f"--relations must be 1..{len(RELATIONS)}, got {self.relations}")
        if not 2 <= self.values <= min(len(v) for v in RELATIONS.values()):
            raise CCError(f"--values must be 2..{min(len(v) for v in RELATIONS.values())}, got {self.values}")
        if self.entities < 4:
            raise CCError(f"--entities must be >= 4, got {self.entities}")
        if not 0 < self.heldout_fraction < 1:
            raise CCError(f"--heldout-fraction must be in (0, 1), got {self.heldout_fraction}")
        if not 0 <= self.dictionary_fraction <= 1:
            raise CCError(f"--dictionary-fraction must be in [0, 1], got {self.dictionary_fraction}")
        if self.hidden_size % self.heads:
            raise CCError(f"--hidden-size {self.hidden_size} is not a multiple of --heads {self.heads}")
        for name in ("layers", "batch_size", "eval_batch_size", "bootstrap_reps"):
            if getattr(self, name) < 1:
                raise CCError(f"--{name.replace('_', '-')} must be >= 1")
        check_train_options(self.train_options, self.fusion)


_RESERVED = {"model", "data", "output", "method", "seed", "epochs", "max_steps", "lr", "batch_size"}


def check_train_options(options: dict, fusion: str | None) -> dict:
    """Coerce ``--train-option`` values to TrainConfig's types; options the runner sets itself
    (data, budget, method, seed) are refused so that both methods keep the same budget."""
    from cctuning.config import coerce
    from cctuning.training import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    out = {}
    for key, value in options.items():
        name = str(key).replace("-", "_")
        if name not in hints:
            raise CCError(f"--train-option {key}: not a `cctuning train` option")
        if name in _RESERVED:
            raise CCError(f"--train-option {key}: set by the transfer task itself (use its own flags)")
        out[name] = coerce(value, hints[name], f"--train-option {key}")
    if fusion is not None:
        if "fusion" not in hints:
            raise CCError("--fusion: this version of `cctuning train` has no fusion option")
        out["fusion"] = coerce(fusion, hints["fusion"], "--fusion")
    meta = {f.name: f.metadata for f in fields(TrainConfig)}
    for name, value in out.items():
        choices = meta[name].get("choices")
        if choices and value not in choices:
            flag = "--fusion" if name == "fusion" else f"--train-option {name}"
            raise CCError(f"{flag}: expected one of {', '.join(choices)}, got {value!r}")
    return out


# -- the world ---------------------------------------------------------------------------------
@dataclass
class World:
    """Entities, relations, facts, the train/held-out split and the dictionary of one seed."""

    seed: int
    english_names: list[str]  # entity i's English name
    foreign_names: list[str]  # entity i's foreign name
    relations: list[str]  # English relation nouns
    foreign_relations: list[str]  # their foreign words
    answers: dict[str, list[str]]  # relation → candidate answer words
    facts: dict[tuple[int, int], int]  # (entity, relation index) → index into answers[relation]
    train_entities: list[int]
    heldout_entities: list[int]
    dictionary_entities: list[int]

    def answer(self, entity: int, relation: int) -> str:
        rel = self.relations[relation]
        return self.answers[rel][self.facts[entity, relation]]

    def english_question(self, entity: int, relation: int) -> str:
        return f"what is the {self.relations[relation]} of {self.english_names[entity]} ?"

    def foreign_question(self, entity: int, relation: int) -> str:
        return (
            f"{self.foreign_names[entity]} {FOREIGN_FUNCTION['of']} {self.foreign_relations[relation]} "
            f"{FOREIGN_FUNCTION['what']} ?"
        )

    def dictionary(self) -> list[tuple[str, str]]:
        """(English word, foreign word) pairs: function and relation words, then the declared entities."""
        pairs = [(en, fo) for en, fo in FOREIGN_FUNCTION.items()]
        pairs += list(zip(self.relations, self.foreign_relations))
        pairs += [(self.english_names[e], self.foreign_names[e]) for e in self.dictionary_entities]
        return pairs

    def vocabulary(self) -> list[str]:
        words = list(TEMPLATE_WORDS) + list(ENGLISH_FUNCTION) + list(DICTIONARY_WORDS)
        words += list(FOREIGN_FUNCTION.values()) + self.relations + self.foreign_relations
        words += [w for rel in self.relations for w in self.answers[rel]]
        words += self.english_names + self.foreign_names
        return list(SPECIAL_TOKENS) + list(dict.fromkeys(words))


def _names(rng: random.Random, syllables: list[str], count: int, taken: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < count:
        name = "".join(rng.choice(syllables) for _ in range(rng.choice((2, 3))))
        if name not in taken:
            taken.add(name)
            out.append(name)
    return out


def build_world(cfg: TransferConfig, seed: int) -> World:
    """The world of one seed: names, facts and splits all drawn from ``random.Random(seed)``."""
    rng = random.Random(f"cctuning-transfer-{seed}")
    relations = list(RELATIONS)[: cfg.relations]
    answers = {rel: RELATIONS[rel][: cfg.values] for rel in relations}
    taken = set(TEMPLATE_WORDS) | set(ENGLISH_FUNCTION) | set(DICTIONARY_WORDS)
    taken |= set(FOREIGN_FUNCTION.values()) | {w for words in RELATIONS.values() for w in words}
    taken |= set(RELATIONS)
    foreign_relations = _names(rng, _FO_SYLLABLES, len(relations), taken)
    english_names = _names(rng, _EN_SYLLABLES, cfg.entities, taken)
    foreign_names = _names(rng, _FO_SYLLABLES, cfg.entities, taken)
    facts = {(e, r): rng.randrange(cfg.values) for e in range(cfg.entities) for r in range(len(relations))}
    order = list(range(cfg.entities))
    rng.shuffle(order)
    n_held = min(cfg.entities - 1, max(1, round(cfg.entities * cfg.heldout_fraction)))
    heldout, train = sorted(order[:n_held]), sorted(order[n_held:])
    dictionary = []
    for part in (train, heldout):  # stratified: the same fraction of each split is in the dictionary
        chosen = part[:]
        rng.shuffle(chosen)
        dictionary += chosen[: round(len(part) * cfg.dictionary_fraction)]
    return World(
        seed=seed,
        english_names=english_names,
        foreign_names=foreign_names,
        relations=relations,
        foreign_relations=foreign_relations,
        answers=answers,
        facts=facts,
        train_entities=train,
        heldout_entities=heldout,
        dictionary_entities=sorted(dictionary),
    )


def stage1_records(world: World) -> list[dict]:
    """Every fact in English, and the dictionary in both directions."""
    rows = [
        {"instruction": world.english_question(e, r), "output": world.answer(e, r), "lang": "en"}
        for e in range(len(world.english_names))
        for r in range(len(world.relations))
    ]
    for en, fo in world.dictionary():
        rows.append({"instruction": f"what is the english word for {fo} ?", "output": en, "lang": "dict"})
        rows.append({"instruction": f"what is the foreign word for {en} ?", "output": fo, "lang": "dict"})
    return rows


def stage2_records(world: World, english_replay: bool = False) -> list[dict]:
    """The training entities' facts in the official format (foreign instruction, answer, English
    instruction); with ``english_replay`` also every fact in English (``instruction_en`` is the
    instruction itself), so that stage 2 does not wash out the English knowledge the English pass
    has to supply. No held-out entity occurs in a foreign record."""
    rows = [
        {
            "instruction": world.foreign_question(e, r),
            "output": world.answer(e, r),
            "instruction_en": world.english_question(e, r),
            "lang": FOREIGN_LANG,
        }
        for e in world.train_entities
        for r in range(len(world.relations))
    ]
    if english_replay:
        rows += [
            {
                "instruction": world.english_question(e, r),
                "output": world.answer(e, r),
                "instruction_en": world.english_question(e, r),
                "lang": "en",
            }
            for e in range(len(world.english_names))
            for r in range(len(world.relations))
        ]
    return rows


def majority_baseline(world: World, items: list[dict]) -> dict:
    """Accuracy of answering every question with its relation's most frequent answer among the
    training entities' facts (what a model can get from the foreign data's answer prior alone)."""
    best = {}
    for r, rel in enumerate(world.relations):
        counts = [0] * len(world.answers[rel])
        for e in world.train_entities:
            counts[world.facts[e, r]] += 1
        best[rel] = world.answers[rel][max(range(len(counts)), key=counts.__getitem__)]
    return accuracy_summary([best[it["relation"]] == it["answer"] for it in items])


def eval_items(world: World, entities: list[int]) -> list[dict]:
    """Questions about ``entities`` with their gold answer and the relation's candidates."""
    dictionary = set(world.dictionary_entities)
    return [
        {
            "entity": e,
            "relation": world.relations[r],
            "instruction": world.foreign_question(e, r),
            "instruction_en": world.english_question(e, r),
            "answer": world.answer(e, r),
            "candidates": world.answers[world.relations[r]],
            "in_dictionary": e in dictionary,
        }
        for e in entities
        for r in range(len(world.relations))
    ]


# -- tokenizer and model -----------------------------------------------------------------------
def build_tokenizer(world: World):
    """A word-level fast tokenizer over the world's vocabulary (whitespace and punctuation split)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(world.vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def build_model(cfg: TransferConfig, vocab_size: int, seed: int):
    """A randomly initialised tiny Llama (float32)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "llama",
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=4 * cfg.hidden_size,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


# -- evaluation --------------------------------------------------------------------------------
def score_candidates(model, tokenizer, items: list[dict], connection: str, batch_size: int) -> list[dict]:
    """For each item, the teacher-forced NLL of every candidate answer (answer + end of sequence)
    under ``connection``, through :func:`cctuning.eval.nll.item_nll`; the prediction is the
    candidate of lowest NLL. Returns one dict per item (prediction, correct, chosen layer)."""
    from cctuning.data.collator import CCCollator
    from cctuning.data.encoding import PromptEncoder
    from cctuning.eval.nll import item_nll

    encoder = PromptEncoder(tokenizer, _prompt_format(model))
    english = connection == "english"
    features, owners = [], []
    for i, item in enumerate(items):
        for cand in item["candidates"]:
            ex = encoder.encode_example(
                item["instruction"], cand, item["instruction_en"] if english else None
            )
            features.append(ex.features())
            owners.append(i)
    collate = CCCollator(tokenizer.pad_token_id, "right")
    device = model.arch.embeddings.weight.device
    nll: list[float] = []
    layers: list[int | None] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(features), batch_size):
            batch = {k: v.to(device) for k, v in collate(features[start : start + batch_size]).items()}
            sums, _, chosen = item_nll(model, batch, connection)
            nll += sums.tolist()
            layers += [None] * len(sums) if chosen is None else chosen.tolist()
    finally:
        model.train(was_training)
    out, pos = [], 0
    for item in items:
        k = len(item["candidates"])
        scores = nll[pos : pos + k]
        best = min(range(k), key=lambda j: scores[j])
        out.append(
            {
                "prediction": item["candidates"][best],
                "correct": item["candidates"][best] == item["answer"],
                "nll": scores,
                "layer": layers[pos],  # the same prompt for every candidate: one choice per item
            }
        )
        pos += k
    return out


def _prompt_format(model):
    """The model's saved prompt format (a dict in older versions of CCConfig)."""
    from cctuning.data.encoding import PromptFormat

    fmt = model.cc_config.prompt_format
    return PromptFormat.from_dict(fmt) if isinstance(fmt, dict) else fmt


def english_items(items: list[dict]) -> list[dict]:
    """The same questions asked in English (for the stage-1 English accuracy)."""
    return [{**it, "instruction": it["instruction_en"]} for it in items]


def layer_histogram(layers: list[int | None], num_layers: int) -> list[int]:
    counts = [0] * num_layers
    for layer in layers:
        if layer is not None:
            counts[layer] += 1
    return counts


# -- what the activations at p encode ----------------------------------------------------------
def ridge_probe(
    train_x: torch.Tensor, train_y: list[int], test_x: torch.Tensor, classes: int, ridge: float = 1e-2
) -> torch.Tensor:
    """A linear least-squares probe (one-hot targets, bias, ridge ``λ · mean(diag XᵀX)``) fitted on
    ``train_x`` (N, d); returns the scores of ``test_x`` (M, classes)."""
    x = torch.cat([train_x.double(), torch.ones(len(train_x), 1, dtype=torch.float64)], dim=1)
    y = torch.nn.functional.one_hot(torch.tensor(train_y), classes).double()
    gram = x.T @ x
    lam = ridge * float(gram.diagonal().mean())
    w = torch.linalg.solve(gram + lam * torch.eye(len(gram), dtype=torch.float64), x.T @ y)
    test = torch.cat([test_x.double(), torch.ones(len(test_x), 1, dtype=torch.float64)], dim=1)
    return test @ w


def probe_accuracy(train_x, train_items: list[dict], test_x, test_items: list[dict]) -> float:
    """Accuracy of a probe fitted on ``train_x`` (answers of ``train_items``) at picking the gold
    answer of ``test_items`` among their relation's candidates."""
    words = sorted({w for it in train_items + test_items for w in it["candidates"]})
    index = {w: i for i, w in enumerate(words)}
    scores = ridge_probe(train_x, [index[it["answer"]] for it in train_items], test_x, len(words))
    hits = 0
    for row, it in zip(scores, test_items):
        best = max(it["candidates"], key=lambda w: float(row[index[w]]))
        hits += best == it["answer"]
    return hits / len(test_items)


def activation_diagnostics(model, tokenizer, matrix, train_items, held_items) -> dict:
    """Per layer: the Transform Matrix's cosine on the held-out entities' prompts (before and after
    mapping), and linear probes of the answer at p, fitted on the training entities' prompts and
    tested on the held-out ones: English → English (the oracle's vectors), English → transformed
    foreign (the transform's vectors, read as English ones), foreign → foreign."""
    from cctuning.data.encoding import PromptEncoder
    from cctuning.inference.matrix import prompt_activations, transform_error

    encoder = PromptEncoder(tokenizer, _prompt_format(model))
    pad = tokenizer.pad_token_id

    def acts(items, key):
        return prompt_activations(model, encoder, [it[key] for it in items], 64, pad)

    with torch.no_grad():
        en_train, fo_train = acts(train_items, "instruction_en"), acts(train_items, "instruction")
        en_held, fo_held = acts(held_items, "instruction_en"), acts(held_items, "instruction")
    mapped = matrix.apply(fo_held)
    out = []
    for layer in range(en_held.shape[1]):
        sl = slice(layer, layer + 1)
        out.append(
            {
                "layer": layer,
                "cosine_before": transform_error(None, fo_held[:, sl], en_held[:, sl])["cosine"],
                "cosine_after": transform_error(matrix.matrix, fo_held[:, sl], en_held[:, sl])["cosine"],
                "probe_english": probe_accuracy(
                    en_train[:, layer], train_items, en_held[:, layer], held_items
                ),
                "probe_transformed": probe_accuracy(
                    en_train[:, layer], train_items, mapped[:, layer], held_items
                ),
                "probe_foreign": probe_accuracy(
                    fo_train[:, layer], train_items, fo_held[:, layer], held_items
                ),
            }
        )
    return {
        "cosine_before": transform_error(None, fo_held, en_held)["cosine"],
        "cosine_after": transform_error(matrix.matrix, fo_held, en_held)["cosine"],
        "per_layer": out,
    }


# -- the pipeline ------------------------------------------------------------------------------
WORLD_NAME = "world.json"  # written first into a seed folder; marks the folder as ours to rewrite


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def _seed_folder(root: Path, seed: int) -> Path:
    """A fresh folder for one seed; an earlier run's folder (it has world.json) is replaced, any
    other non-empty folder is refused."""
    import shutil

    folder = root / f"seed-{seed}"
    if folder.exists():
        if not (folder / WORLD_NAME).is_file() and any(folder.iterdir()):
            raise CCError(
                f"{folder} exists and was not written by the transfer task; choose another --output"
            )
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def _train(
    base: Path, data: Path, output: Path, method: str, epochs: float, lr: float, seed: int, cfg, extra
):
    from cctuning.training import TrainConfig, train

    options = dict(
        model=str(base),
        data=str(data),
        output=str(output),
        method=method,
        epochs=epochs,
        lr=lr,
        batch_size=cfg.batch_size,
        seed=seed,
        template="plain",
        max_length=64,
        warmup_ratio=0.05,
        trainer={"save_strategy": "no", "disable_tqdm": True, "logging_strategy": "no"},
    )
    options.update(extra)
    train(TrainConfig(**options))
    return json.loads((output / "train_results.json").read_text(encoding="utf-8"))


def _correct(rows: list[dict]) -> list[bool]:
    return [bool(r["correct"]) for r in rows]


def run_seed(cfg: TransferConfig, seed: int, folder: Path) -> dict:
    """One world: stage 1, stage 2 (sft and cc from the stage-1 folder), the Transform Matrix and
    the four evaluation cells. Writes the data, models and per-item predictions under ``folder``."""
    from cctuning.data.records import load_records
    from cctuning.inference.matrix import fit_transform_matrix
    from cctuning.loading import load_for_inference

    times: dict[str, float] = {}
    tick = time.time()
    world = build_world(cfg, seed)
    write_json(
        folder / WORLD_NAME, asdict(world) | {"facts": [[e, r, v] for (e, r), v in world.facts.items()]}
    )
    tokenizer = build_tokenizer(world)
    base = folder / "base"
    build_model(cfg, len(tokenizer), seed).save_pretrained(base)
    tokenizer.save_pretrained(base)
    s1_rows, s2_rows = stage1_records(world), stage2_records(world, cfg.stage2_english)
    s1_file = _write_jsonl(folder / "stage1.jsonl", s1_rows)
    s2_file = _write_jsonl(folder / "stage2.jsonl", s2_rows)
    n_foreign = sum(r["lang"] == FOREIGN_LANG for r in s2_rows)
    held = eval_items(world, world.heldout_entities)
    train_items = eval_items(world, world.train_entities)
    _write_jsonl(folder / "heldout.jsonl", held)
    extra = check_train_options(cfg.train_options, cfg.fusion)

    logger.info("seed %d: stage 1, %d English/dictionary records", seed, len(s1_rows))
    stage1 = folder / "stage1"
    s1 = _train(base, s1_file, stage1, "sft", cfg.stage1_epochs, cfg.stage1_lr, seed, cfg, {})
    times["stage1"] = time.time() - tick

    tick = time.time()
    model, tok, _ = load_for_inference(str(stage1))
    bs = cfg.eval_batch_size
    s1_en_held = score_candidates(model, tok, english_items(held), "none", bs)
    s1_en_train = score_candidates(model, tok, english_items(train_items), "none", bs)
    s1_foreign = score_candidates(model, tok, held, "none", bs)
    logger.info(
        "seed %d: stage-1 English accuracy %.3f (held-out entities), %.3f (training entities)",
        seed,
        sum(_correct(s1_en_held)) / len(held),
        sum(_correct(s1_en_train)) / len(train_items),
    )
    times["stage1_eval"] = time.time() - tick

    runs = {}
    for method in ("sft", "cc"):
        tick = time.time()
        logger.info("seed %d: stage 2 (%s), %d records (%d foreign)", seed, method, len(s2_rows), n_foreign)
        runs[method] = _train(
            stage1, s2_file, folder / method, method, cfg.stage2_epochs, cfg.stage2_lr, seed, cfg, extra
        )
        times[f"stage2_{method}"] = time.time() - tick

    tick = time.time()
    cc, cc_tok, _ = load_for_inference(str(folder / "cc"))
    # the matrix maps foreign activations to English ones: fitted on the foreign records only
    records = [r for r in load_records(s2_file, require_english=True) if r.lang == FOREIGN_LANG]
    matrix, fit = fit_transform_matrix(
        cc, cc_tok, records, samples=len(records), ridge=cfg.matrix_ridge, seed=seed, heldout_fraction=0.1
    )
    matrix.save(folder / "cc")
    cc.set_transform(matrix)
    diagnostics = activation_diagnostics(cc, cc_tok, matrix, train_items, held)
    times["matrix"] = time.time() - tick

    tick = time.time()
    sft, sft_tok, _ = load_for_inference(str(folder / "sft"))
    models = {"sft": (sft, sft_tok), "cc": (cc, cc_tok)}
    results = {name: score_candidates(*models[method], held, conn, bs) for name, method, conn in CELLS}
    en_after = {m: score_candidates(*models[m], english_items(held), "none", bs) for m in models}
    times["eval"] = time.time() - tick

    num_layers = cc.arch.num_layers
    in_dict = [it["in_dictionary"] for it in held]
    cells = {}
    for name, rows in results.items():
        correct = _correct(rows)
        cells[name] = {
            **accuracy_summary(correct),
            "in_dictionary": accuracy_summary([c for c, d in zip(correct, in_dict) if d]),
            "not_in_dictionary": accuracy_summary([c for c, d in zip(correct, in_dict) if not d]),
            "layer_histogram": layer_histogram([r["layer"] for r in rows], num_layers),
        }
    margins = {
        name: paired_bootstrap_mean(
            _correct(results[name]), _correct(results["sft"]), cfg.bootstrap_reps, seed
        )
        for name, _, _ in CELLS[1:]
    }
    _write_jsonl(
        folder / "predictions.jsonl",
        [
            {
                **it,
                **{
                    name: {"prediction": results[name][i]["prediction"], "layer": results[name][i]["layer"]}
                    for name in results
                },
            }
            for i, it in enumerate(held)
        ],
    )
    logger.info(
        "seed %d: held-out foreign accuracy %s",
        seed,
        ", ".join(f"{name} {cells[name]['accuracy']:.3f}" for name in cells),
    )
    return {
        "seed": seed,
        "world": {
            "entities": len(world.english_names),
            "train_entities": len(world.train_entities),
            "heldout_entities": len(world.heldout_entities),
            "dictionary_entities": len(world.dictionary_entities),
            "dictionary_pairs": len(world.dictionary()),
            "stage1_records": len(s1_rows),
            "stage2_records": len(s2_rows),
            "stage2_foreign_records": n_foreign,
            "heldout_items": len(held),
            "vocabulary": len(tokenizer),
            "chance": 1 / cfg.values,
        },
        "stage1": {
            "english_accuracy_heldout_entities": accuracy_summary(_correct(s1_en_held)),
            "english_accuracy_train_entities": accuracy_summary(_correct(s1_en_train)),
            "foreign_accuracy_heldout": accuracy_summary(_correct(s1_foreign)),
            "train_loss": s1["train_loss"],
            "steps": s1["global_step"],
        },
        "stage2": {m: {"train_loss": runs[m]["train_loss"], "steps": runs[m]["global_step"]} for m in runs},
        "english_accuracy_after_stage2": {
            m: accuracy_summary(_correct(rows)) for m, rows in en_after.items()
        },
        "majority_baseline": majority_baseline(world, held),
        "cells": cells,
        "margins_over_sft": margins,
        "layer_choice_training": runs["cc"]["layer_choice_counts"],
        "matrix": {"fit": fit.fit, "heldout_pairs": fit.heldout, "heldout_entities": diagnostics},
        "seconds": {k: round(v, 2) for k, v in times.items()},
    }


def _aggregate(parts: list[dict]) -> dict:
    """Per-seed accuracy summaries → mean over seeds (95% t-interval), the per-seed values and
    the items pooled over seeds (Wilson 95% interval; the seeds' worlds are independent)."""
    out = mean_interval([p["accuracy"] for p in parts], 0.0, 1.0)
    out["per_seed"] = [p["accuracy"] for p in parts]
    k, n = sum(p["correct"] for p in parts), sum(p["n"] for p in parts)
    low, high = wilson_interval(k, n)
    out["pooled"] = {"accuracy": k / n, "ci_low": low, "ci_high": high, "correct": k, "n": n}
    return out


def summarize(cfg: TransferConfig, runs: list[dict], seconds: float) -> dict:
    """Everything in summary.json (see :func:`_aggregate` for the intervals)."""
    from datetime import date

    from cctuning.versions import versions

    summary: dict = {"date": date.today().isoformat(), "seeds": [r["seed"] for r in runs]}
    for name, method, connection in CELLS:
        per_seed = [r["cells"][name] for r in runs]
        cell = _aggregate(per_seed)
        cell.update(
            method=method,
            connection=connection,
            in_dictionary=_aggregate([c["in_dictionary"] for c in per_seed]),
            not_in_dictionary=_aggregate([c["not_in_dictionary"] for c in per_seed]),
            layer_histogram=[sum(col) for col in zip(*(c["layer_histogram"] for c in per_seed))],
        )
        summary[f"{name}_accuracy"] = cell
    summary["chance_accuracy"] = 1 / cfg.values
    summary["majority_baseline_accuracy"] = _aggregate([r["majority_baseline"] for r in runs])
    summary["stage1_foreign_accuracy"] = _aggregate([r["stage1"]["foreign_accuracy_heldout"] for r in runs])
    summary["margins_over_sft"] = {
        name: {
            **mean_interval([r["margins_over_sft"][name]["margin"] for r in runs], -1.0, 1.0),
            "per_seed": [r["margins_over_sft"][name] for r in runs],
        }
        for name, _, _ in CELLS[1:]
    }
    summary["stage1_english_accuracy"] = _aggregate(
        [r["stage1"]["english_accuracy_heldout_entities"] for r in runs]
    )
    summary["stage1_english_accuracy_train_entities"] = _aggregate(
        [r["stage1"]["english_accuracy_train_entities"] for r in runs]
    )
    summary["english_accuracy_after_stage2"] = {
        m: _aggregate([r["english_accuracy_after_stage2"][m] for r in runs]) for m in ("sft", "cc")
    }
    summary["layer_choice"] = {
        "training": [sum(col) for col in zip(*(r["layer_choice_training"] for r in runs))],
        "eval_oracle": summary["cc_oracle_accuracy"]["layer_histogram"],
        "eval_transform": summary["cc_transform_accuracy"]["layer_histogram"],
    }
    diag = [r["matrix"]["heldout_entities"] for r in runs]
    summary["matrix"] = {
        "heldout_pairs_cosine_before": mean_interval(
            [r["matrix"]["heldout_pairs"]["before"]["cosine"] for r in runs], -1.0, 1.0
        ),
        "heldout_pairs_cosine_after": mean_interval(
            [r["matrix"]["heldout_pairs"]["after"]["cosine"] for r in runs], -1.0, 1.0
        ),
        "heldout_entities_cosine_before": mean_interval([d["cosine_before"] for d in diag], -1.0, 1.0),
        "heldout_entities_cosine_after": mean_interval([d["cosine_after"] for d in diag], -1.0, 1.0),
        "per_layer": [
            {
                key: (
                    layer
                    if key == "layer"
                    else mean_interval([d["per_layer"][layer][key] for d in diag])["mean"]
                )
                for key in diag[0]["per_layer"][layer]
            }
            for layer in range(len(diag[0]["per_layer"]))
        ],
    }
    summary["seconds"] = {"total": round(seconds, 1), "per_seed": [r["seconds"] for r in runs]}
    summary["settings"] = asdict(cfg)
    summary["versions"] = versions()
    summary["per_seed"] = runs
    return summary


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _interval(d: dict) -> str:
    if d.get("ci_low") is None:
        return "–"
    return f"[{_pct(d['ci_low'])}, {_pct(d['ci_high'])}]"


CELL_LABELS = {
    "sft": "SFT",
    "cc_oracle": "CC, English oracle",
    "cc_transform": "CC, Transform Matrix",
    "cc_none": "CC, no connection",
}


def summary_markdown(summary: dict) -> str:
    """The table of summary.md (and of the CLI): accuracy in % on the held-out foreign questions."""
    seeds = summary["seeds"]
    lines = [
        "Held-out facts asked in the foreign language, accuracy in % (chance "
        f"{_pct(summary['chance_accuracy'])}, majority answer {_pct(summary['majority_baseline_accuracy']['mean'])}); "
        f"seeds {', '.join(map(str, seeds))}; {summary['date']}",
        "",
        "| cell | connection | mean over seeds | 95% t-interval | pooled items [Wilson 95%] "
        "| in dictionary | not in dictionary | margin over SFT [95% t] |",
        "|---|---|---:|---|---|---:|---:|---|",
    ]
    for name, label in CELL_LABELS.items():
        c = summary[f"{name}_accuracy"]
        p = c["pooled"]
        margin = "–"
        if name != "sft":
            m = summary["margins_over_sft"][name]
            margin = f"{100 * m['mean']:+.1f} {_interval(m)}"
        lines.append(
            f"| {label} | {c['connection']} | {_pct(c['mean'])} | {_interval(c)} | "
            f"{_pct(p['accuracy'])} [{_pct(p['ci_low'])}, {_pct(p['ci_high'])}] (n={p['n']}) | "
            f"{_pct(c['in_dictionary']['pooled']['accuracy'])} | {_pct(c['not_in_dictionary']['pooled']['accuracy'])} | {margin} |"
        )
    s1 = summary["stage1_english_accuracy"]
    after = summary["english_accuracy_after_stage2"]
    m = summary["matrix"]
    lc = summary["layer_choice"]
    lines += [
        "",
        f"Stage-1 English accuracy on the held-out entities' facts: {_pct(s1['mean'])} {_interval(s1)} "
        f"(training entities {_pct(summary['stage1_english_accuracy_train_entities']['mean'])}); "
        f"after stage 2: SFT {_pct(after['sft']['mean'])}, CC {_pct(after['cc']['mean'])}.",
        f"Decision Maker layer choices: training {lc['training']}, evaluation oracle {lc['eval_oracle']}, "
        f"transform {lc['eval_transform']}.",
        f"Transform Matrix cosine to the English activations on held-out entities: "
        f"{m['heldout_entities_cosine_before']['mean']:.3f} before, {m['heldout_entities_cosine_after']['mean']:.3f} after "
        f"(held-out training pairs: {m['heldout_pairs_cosine_before']['mean']:.3f} → {m['heldout_pairs_cosine_after']['mean']:.3f}).",
        "",
        "| layer | cosine before | cosine after | probe English→English | probe English→transformed foreign "
        "| probe foreign→foreign |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in m["per_layer"]:
        lines.append(
            f"| {row['layer']} | {row['cosine_before']:.3f} | {row['cosine_after']:.3f} | "
            f"{_pct(row['probe_english'])} | {_pct(row['probe_transformed'])} | {_pct(row['probe_foreign'])} |"
        )
    lines += ["", f"Wall-clock: {summary['seconds']['total']:.0f} s."]
    return "\n".join(lines) + "\n"


def run_transfer_task(cfg: TransferConfig) -> dict:
    """Run every seed and write ``summary.json`` and ``summary.md`` into ``cfg.output``."""
    cfg.check()
    started = time.time()
    root = Path(cfg.output)
    root.mkdir(parents=True, exist_ok=True)
    from transformers.utils import logging as hf_logging

    threads, bars = torch.get_num_threads(), hf_logging.is_progress_bar_enabled()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    hf_logging.disable_progress_bar()  # a dozen tiny loads and saves per seed: progress is logged instead
    try:
        runs = []
        for seed in cfg.seed_values():
            runs.append(run_seed(cfg, seed, _seed_folder(root, seed)))
    finally:
        torch.set_num_threads(threads)
        if bars:
            hf_logging.enable_progress_bar()
    summary = summarize(cfg, runs, time.time() - started)
    write_json(root / SUMMARY_NAME, summary)
    write_text(root / SUMMARY_MD_NAME, summary_markdown(summary))
    logger.info(
        "transfer task finished in %.0f s; summary in %s", summary["seconds"]["total"], root / SUMMARY_NAME
    )
    return summary


# -- command line ------------------------------------------------------------------------------
def add_arguments(parser) -> None:
    """The flags of ``cctuning transfer-task``: one per TransferConfig field, ``--seed S [S ...]``
    and repeatable ``--train-option KEY=VALUE`` (any ``cctuning train`` option for stage 2)."""
    from cctuning.config import add_dataclass_arguments

    add_dataclass_arguments(parser, TransferConfig)
    parser.add_argument(
        "--seed",
        type=int,
        nargs="+",
        dest="seed_list",
        metavar="S",
        help="explicit seeds (overrides --seeds)",
    )
    parser.add_argument(
        "--train-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a `cctuning train` option for both stage-2 trainings, e.g. layer_choice=fixed:-1 (repeatable)",
    )


def config_from_args(args) -> TransferConfig:
    from cctuning.config import build_config

    flags = {
        k: v
        for k, v in vars(args).items()
        if k not in ("command", "config", "verbose", "func", "train_option")
    }
    if not flags.get("seed_list"):
        flags.pop("seed_list", None)
    options = {}
    for item in args.train_option:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CCError(f"--train-option {item!r}: expected KEY=VALUE")
        options[key.strip()] = value.strip()
    flags["train_options"] = options
    cfg = build_config(TransferConfig, None, flags)
    cfg.check()
    return cfg
