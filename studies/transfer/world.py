"""The synthetic world of one seed: entities with an English and a foreign name, relations, facts,
the train/held-out split and the bilingual dictionary; the records of both training stages and the
evaluation items drawn from it; the word-level tokenizer over its vocabulary and the tiny model."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

if TYPE_CHECKING:  # config.py imports this module's RELATIONS
    from studies.transfer.config import TransferConfig

FOREIGN_LANG = "xx"  # the synthetic foreign language's code in the records
WORLDS = ("default", "understood")  # --world: see docs/transfer.md
# answer words per relation (shared by both languages); a world uses the first `values` of each
RELATIONS = {
    "color": ["red", "blue", "green", "yellow", "black", "white", "pink", "brown", "gray", "purple"],
    "size": ["tiny", "small", "short", "medium", "tall", "large", "huge", "giant", "wide", "narrow"],
    "food": ["rice", "bread", "fish", "meat", "soup", "fruit", "cheese", "beans", "corn", "eggs"],
    "sport": ["chess", "tennis", "golf", "rugby", "boxing", "skiing", "rowing", "karate", "polo", "darts"],
    "season": ["spring", "summer", "autumn", "winter", "monsoon", "dawn", "dusk", "noon", "night", "harvest"],
    "metal": ["iron", "gold", "silver", "copper", "tin", "lead", "zinc", "nickel", "bronze", "steel"],
}
# the understood world's context relations (taught in both languages and code-switched, never evaluated)
CONTEXT_RELATIONS = {
    "drink": ["water", "tea", "coffee", "milk", "juice", "wine", "beer", "cocoa", "cider", "soda"],
    "tool": ["hammer", "saw", "drill", "wrench", "axe", "chisel", "shovel", "rake", "pliers", "file"],
    "animal": ["dog", "cat", "horse", "cow", "goat", "sheep", "pig", "duck", "mouse", "fox"],
    "music": ["jazz", "rock", "blues", "opera", "folk", "funk", "disco", "reggae", "techno", "polka"],
    "shape": ["circle", "square", "oval", "cross", "star", "heart", "arrow", "ring", "cone", "cube"],
    "fabric": ["wool", "silk", "cotton", "linen", "denim", "velvet", "satin", "nylon", "felt", "lace"],
    # beyond the default six (--context-relations up to 12); none is spelled with the English names'
    # syllables, so no name can be one of these words
    "tree": ["oak", "pine", "elm", "ash", "birch", "maple", "willow", "cedar", "palm", "fir"],
    "flower": ["peony", "tulip", "lily", "daisy", "orchid", "iris", "poppy", "lotus", "violet", "aster"],
    "bird": ["crow", "owl", "hawk", "swan", "robin", "eagle", "parrot", "finch", "heron", "dove"],
    "vehicle": ["car", "bus", "truck", "train", "boat", "bike", "tram", "van", "ship", "plane"],
    "gem": ["ruby", "pearl", "opal", "jade", "amber", "topaz", "onyx", "agate", "garnet", "quartz"],
    "spice": ["salt", "pepper", "ginger", "cumin", "basil", "mint", "thyme", "sage", "dill", "clove"],
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
    # the understood world's context relations (never evaluated; empty in the default world): their
    # English and foreign words, and (entity, context index) → index into answers[context relation]
    context_relations: list[str] = field(default_factory=list)
    foreign_context_relations: list[str] = field(default_factory=list)
    context_facts: dict[tuple[int, int], int] = field(default_factory=dict)

    def answer(self, entity: int, relation: int) -> str:
        rel = self.relations[relation]
        return self.answers[rel][self.facts[entity, relation]]

    def english_question(self, entity: int, relation: int) -> str:
        return _english_question(self.relations[relation], self.english_names[entity])

    def foreign_question(self, entity: int, relation: int) -> str:
        return _foreign_question(self.foreign_names[entity], self.foreign_relations[relation])

    def context_answer(self, entity: int, context: int) -> str:
        rel = self.context_relations[context]
        return self.answers[rel][self.context_facts[entity, context]]

    def context_english_question(self, entity: int, context: int) -> str:
        return _english_question(self.context_relations[context], self.english_names[entity])

    def context_foreign_question(self, entity: int, context: int) -> str:
        return _foreign_question(self.foreign_names[entity], self.foreign_context_relations[context])

    def context_record(self, entity: int, context: int) -> dict:
        """A context-relation fact as a foreign record in the official format."""
        return {
            "instruction": self.context_foreign_question(entity, context),
            "output": self.context_answer(entity, context),
            "instruction_en": self.context_english_question(entity, context),
            "lang": FOREIGN_LANG,
        }

    def dictionary(self) -> list[tuple[str, str]]:
        """(English word, foreign word) pairs: function and relation words, then the declared entities."""
        pairs = [(en, fo) for en, fo in FOREIGN_FUNCTION.items()]
        pairs += list(zip(self.relations, self.foreign_relations))
        pairs += list(zip(self.context_relations, self.foreign_context_relations))
        pairs += [(self.english_names[e], self.foreign_names[e]) for e in self.dictionary_entities]
        return pairs

    def vocabulary(self) -> list[str]:
        words = list(TEMPLATE_WORDS) + list(ENGLISH_FUNCTION) + list(DICTIONARY_WORDS)
        words += list(FOREIGN_FUNCTION.values()) + self.relations + self.foreign_relations
        words += self.context_relations + self.foreign_context_relations
        words += [w for rel in self.answers for w in self.answers[rel]]
        words += self.english_names + self.foreign_names
        return list(SPECIAL_TOKENS) + list(dict.fromkeys(words))


def _english_question(relation: str, name: str) -> str:
    return f"what is the {relation} of {name} ?"


def _foreign_question(name: str, relation: str) -> str:
    return f"{name} {FOREIGN_FUNCTION['of']} {relation} {FOREIGN_FUNCTION['what']} ?"


def _names(rng: random.Random, syllables: list[str], count: int, taken: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < count:
        name = "".join(rng.choice(syllables) for _ in range(rng.choice((2, 3))))
        if name not in taken:
            taken.add(name)
            out.append(name)
    return out


def build_world(cfg: TransferConfig, seed: int) -> World:
    """The world of one seed: names, facts and splits all drawn, in this order, from one
    ``random.Random`` seeded by ``seed`` (a variant that draws more must draw it after these)."""
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
    train, heldout, dictionary = _split_entities(rng, cfg)
    # the understood world draws its context relations after everything the default world draws
    contexts = list(CONTEXT_RELATIONS)[: cfg.context_relations] if cfg.world == "understood" else []
    answers.update({rel: CONTEXT_RELATIONS[rel][: cfg.values] for rel in contexts})
    taken |= set(contexts) | {w for rel in contexts for w in CONTEXT_RELATIONS[rel]}
    foreign_contexts = _names(rng, _FO_SYLLABLES, len(contexts), taken)
    context_facts = {
        (e, c): rng.randrange(cfg.values) for e in range(cfg.entities) for c in range(len(contexts))
    }
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
        dictionary_entities=dictionary,
        context_relations=contexts,
        foreign_context_relations=foreign_contexts,
        context_facts=context_facts,
    )


def _split_entities(rng: random.Random, cfg: TransferConfig) -> tuple[list[int], list[int], list[int]]:
    """The training entities, the held-out ones and the dictionary's (each sorted), drawn in this order."""
    order = list(range(cfg.entities))
    rng.shuffle(order)
    n_held = min(cfg.entities - 1, max(1, round(cfg.entities * cfg.heldout_fraction)))
    heldout, train = sorted(order[:n_held]), sorted(order[n_held:])
    dictionary = []
    for part in (train, heldout):  # stratified: the same fraction of each split is in the dictionary
        chosen = part[:]
        rng.shuffle(chosen)
        dictionary += chosen[: round(len(part) * cfg.dictionary_fraction)]
    return train, heldout, sorted(dictionary)


def stage1_records(world: World) -> list[dict]:
    """Every fact in English, and the dictionary in both directions; in the understood world also
    every context-relation fact in English, in the foreign language and code-switched (the foreign
    names in context: this is how the foreign side comes to understand every entity)."""
    rows = [
        {"instruction": world.english_question(e, r), "output": world.answer(e, r), "lang": "en"}
        for e in range(len(world.english_names))
        for r in range(len(world.relations))
    ]
    rows += context_english_records(world)
    rows += [
        {"instruction": rec["instruction"], "output": rec["output"], "lang": FOREIGN_LANG}
        for rec in context_records(world)
    ]
    rows += code_switched_records(world)
    for en, fo in world.dictionary():
        rows.append({"instruction": f"what is the english word for {fo} ?", "output": en, "lang": "dict"})
        rows.append({"instruction": f"what is the foreign word for {en} ?", "output": fo, "lang": "dict"})
    return rows


def context_records(world: World) -> list[dict]:
    """Every entity's context-relation facts as foreign records (official format); none in the
    default world."""
    return [
        world.context_record(e, c)
        for e in range(len(world.english_names))
        for c in range(len(world.context_relations))
    ]


def code_switched_records(world: World) -> list[dict]:
    """Every entity's context-relation facts code-switched (understood world): the English question
    with the foreign name and the foreign question with the English name (``lang: "cs"``)."""
    rows = []
    for e in range(len(world.english_names)):
        for c, rel in enumerate(world.context_relations):
            answer = world.context_answer(e, c)
            fo_rel = world.foreign_context_relations[c]
            rows.append(
                {
                    "instruction": _english_question(rel, world.foreign_names[e]),
                    "output": answer,
                    "lang": "cs",
                }
            )
            rows.append(
                {
                    "instruction": _foreign_question(world.english_names[e], fo_rel),
                    "output": answer,
                    "lang": "cs",
                }
            )
    return rows


def context_english_records(world: World) -> list[dict]:
    """Every entity's context-relation facts asked in English (none in the default world)."""
    return [
        {
            "instruction": world.context_english_question(e, c),
            "output": world.context_answer(e, c),
            "lang": "en",
        }
        for e in range(len(world.english_names))
        for c in range(len(world.context_relations))
    ]


def matrix_records(world: World) -> list[dict]:
    """The parallel sentences the Transform Matrix is fitted on: the training entities' questions
    (the stage-2 foreign records) and, in the understood world, every entity's context-relation
    questions. Never a held-out entity's question about an evaluated relation."""
    return stage2_records(world) + context_records(world)


def stage2_records(world: World, english_replay: bool = False, context: bool = False) -> list[dict]:
    """The training entities' facts in the official format (foreign instruction, answer, English
    instruction); with ``english_replay`` also every fact in English (``instruction_en`` is the
    instruction itself), so that stage 2 does not wash out the English knowledge the English pass
    has to supply; with ``context`` (understood world) also every entity's context-relation facts
    as foreign records, so that stage 2 does not wash out the foreign side's entity knowledge. No
    held-out entity's evaluated fact occurs in a foreign record."""
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
    if context:
        rows += context_records(world)
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
        rows += [dict(r, instruction_en=r["instruction"]) for r in context_english_records(world)]
    return rows


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
    vocab = {word: i for i, word in enumerate(world.vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def build_model(cfg: TransferConfig, vocab_size: int, seed: int):
    """A randomly initialised tiny Llama (float32)."""
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
