"""A controlled transfer task where CC-Tuning's connection must help by construction.

``python -m studies.transfer --output DIR`` builds a small synthetic world per seed (docs/transfer.md):

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
  connection (``none``); and SFT given CC-Tuning's extra information at the data level through
  the package's ``--augment``: ``english-prompt`` (at SFT's optimizer steps) and
  ``bilingual-prompt`` (scored with the English question given and withheld).

``--world understood`` adds context relations taught in English, foreign and code-switched form for
every entity, so that the foreign side knows the held-out entities (never their evaluated facts),
and linear probes of the entity at p (``probes``).

A held-out entity's foreign name never occurs in stage 2 and its facts are never asked in the
foreign language; only the English pass knows them. The English prompt's FFN activations at p
carry the answer (stage 1 taught the model to predict it there), so a model that learned in
stage 2 to read the injected vector can answer held-out questions; SFT cannot, except through
the dictionary (for the entities it covers). ``summary.json`` reports every cell per seed
(Wilson 95% interval over items), the mean over seeds (95% t-interval) and items pooled over
seeds (independent worlds: Wilson interval), the oracle's paired margin over SFT, stage-1 English
accuracy, the Decision Maker's layer choices and the matrix's fit quality.

Modules: ``config`` (options, trainings and cells), ``world`` (the world, its records, tokenizer and
model), ``scoring`` (candidate scoring, baselines, answer probes), ``probes`` (entity probes),
``run`` (one seed, every seed), ``summary`` (summary.json and summary.md), ``compare`` (paired
margins between any two cells of a finished run), ``merge`` (one summary from one-seed runs),
``reprobe`` and ``matrix_check`` (diagnostics of finished runs' saved models), ``__main__`` (the
command line).
"""
